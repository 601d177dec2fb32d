"""A WebSocket peer for the websocketmanager's tests, written with the
Python `websockets` library (a different implementation than the Rust
peers in the tests). Listens on 127.0.0.1:<port> and behaves by path:

  /echo    sends every frame back unchanged (text as text, binary as binary)
  /silent  reads and never answers
  /drop    echoes, and closes the TCP connection abruptly after 'drop'

Prints "listening <port>" once it accepts connections.
"""

import asyncio
import sys

import websockets


async def handler(ws):
    path = ws.request.path
    async for msg in ws:
        if path == "/silent":
            continue
        if path == "/drop" and msg == "drop":
            ws.transport.abort()
            return
        await ws.send(msg)


async def main(port):
    async with websockets.serve(handler, "127.0.0.1", port, max_size=None):
        print(f"listening {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
