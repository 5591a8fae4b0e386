"""session-proxy: one address for a fleet of stateful WhatsApp gateway instances."""

__version__ = "0.1.0"
