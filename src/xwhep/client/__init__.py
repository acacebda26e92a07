"""The client tier: the Python SDK, the ``xw`` command and the classic ``xw*`` commands."""

from xwhep.client.sdk import Client, XwError

__all__ = ["Client", "XwError"]
