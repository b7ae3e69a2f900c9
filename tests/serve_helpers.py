"""A server on 127.0.0.1 in a thread, for the serving tests."""
import contextlib
import socket
import threading
import time

SEED_PROMPT = ("Q: If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies? "
               "Explain step-by-step.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, tok, **cfg):
    """Yields the base URL (``…/v1``); the app's service is ``running_server.last``."""
    import uvicorn

    from thinkforge.serve import ServeConfig, create_app

    port = free_port()
    app = create_app(ServeConfig(model="unused", port=port, **cfg), model, tok)
    running_server.last = app.app.state.service
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        thread.join(10)
        app.app.state.service.scheduler.close()
