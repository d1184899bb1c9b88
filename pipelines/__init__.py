"""Batch entry points for servers (thin: config file in, the medseg engine does the work)."""
