"""Scale-out over Redis pub/sub: one producer per database, any number of edges.

``wire.py`` is what travels through Redis (envelopes, their checks, the conversions
to and from the source seam's types); ``link.py`` the Redis side (URL, keys and
channels, scripts, reconnecting with backoff); ``producer.py`` publishes a server's
state under a lease; ``edge.py`` is the ``Source`` an edge's hub reads. Only ``link.py``,
``producer.py`` and ``edge.py`` import ``redis``, and nothing imports them unless a
Redis URL is configured.
"""

from __future__ import annotations
