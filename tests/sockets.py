"""What a WebSocket client sees when a consumer refuses it."""


async def refusal(comm):
    """The close code a real client receives. The handshake must be accepted and then closed
    with the code: a close before accept reaches clients as a bare HTTP 403 without it."""
    connected, _ = await comm.connect(timeout=10)  # (the default 1 s is short on a loaded 2-core box)
    if not connected:
        return "refused before accept (a client would get HTTP 403, not the close code)"
    message = await comm.receive_output(timeout=5)
    if message["type"] != "websocket.close":
        return message
    return message.get("code")
