"""The tideflow wire API: generated protobuf and gRPC code in ``v1`` (proto/generate.py)
and two hand-written modules that say how to read it: ``events`` (history event
attributes and classes) and ``search_attributes`` (the search-attribute codec).

Nothing in this package imports SQL or the server, so the SDK and the server share it.
"""
