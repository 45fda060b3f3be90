# A WebSocket client in Python (pip install websockets): one prompt, its answer.
import json

import websockets


async def ask(host: str, session_key: str, prompt: str, sessionid: str) -> str:
    """Start a run in ``session_key`` over a socket and return its answer.
    ``sessionid`` is the cookie a login gave; the Origin names the site itself,
    which ALLOWED_HOSTS allows."""
    async with websockets.connect(
        f"ws://{host}/ws/runs/{session_key}/",
        additional_headers={"Cookie": f"sessionid={sessionid}"},
        origin=f"http://{host}",
    ) as socket:
        await socket.send(json.dumps({"type": "start", "prompt": prompt}))
        answer = ""
        async for frame in socket:
            event = json.loads(frame)
            if event["event"] == "delta":
                answer += event["data"]["text"]
            elif event["event"] == "error":  # a frame the server refused
                raise RuntimeError(event["data"]["error"])
            elif event["event"] == "done":  # {"status": "done" | "stopped" | "error" ...}
                return answer
    raise ConnectionError("The socket closed before the run ended.")
