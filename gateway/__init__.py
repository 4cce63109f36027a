"""The HTTP gateway: OpenAI-compatible endpoints (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``) in front of a scheduler's client socket.

A third kind of process (``pagedserve gateway``), a client of the scheduler through one
shared ``common.client.AsyncClient``; it imports ``common/`` only, never torch nor a service,
and any number of gateways may front one scheduler.
"""
