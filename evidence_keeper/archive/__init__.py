"""Archive: reading evidence back out of the store (export, and later manifests, verify, search)."""
