"""``kubectl evidence``: the commands of the ``kubectl-evidence`` plugin, one module each.

kubectl finds ``kubectl-evidence`` on ``PATH`` and runs it with the rest of the command line
and its own environment (``KUBECONFIG``). The plugin talks to the agents the way ``kubectl``
does: through the API server, with the caller's credentials — ``gaps``, ``preflight`` and
``archive`` reach every agent of the DaemonSet through the pod proxy
(``pods/<pod>:<port>/proxy``); ``search`` and ``export`` read the store with the caller's own
store credentials, at the ``store_url`` the agents are configured with (read from their pod
spec), so the agents never spend node CPU on a search. :mod:`.cluster` holds what the plugin's
commands share.
"""
