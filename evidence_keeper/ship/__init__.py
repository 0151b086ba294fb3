"""Shipping: store backends and the shipper that moves sealed spool segments into them."""
