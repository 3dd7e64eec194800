"""An Intune-ready SCEP certification authority (RFC 8894) for Azure Functions."""

__version__ = "0.1.0"
PRODUCT = "scep-intune-ca"
