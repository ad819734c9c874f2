"""A TVM RPC server that keeps serving after a session crashes.

Run as a script by `tvm-rebirth device start`, on this host and inside the emulated device
(where only the TVM runtime exists, so it imports nothing from tvm_rebirth). TVM's server runs
each session in a forked child; when that child dies (an illegal instruction, a segfault in
a bad module) the stock listen loop raises and the server stops accepting sessions while
its process lives on. Here the crash is logged and the loop goes on, like a phone's server
that the next session finds ready again.

    python resilient_rpc_server.py --tracker HOST:PORT --key KEY [--host 127.0.0.1]
        [--port 9200] [--port-end 9250] [--custom-addr 127.0.0.1] [--load-library LIB]
"""

import argparse
import logging
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracker", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9200)
    ap.add_argument("--port-end", type=int, default=9250)
    ap.add_argument("--custom-addr", default="127.0.0.1")
    ap.add_argument("--load-library")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from tvm.rpc import server

    serve_one = server._serving

    def serve_and_survive(sock, addr, opts, load_library):
        cwd = os.getcwd()
        try:
            serve_one(sock, addr, opts, load_library)
        except RuntimeError as exc:  # the session's child died: report, keep listening
            logging.warning("session from %s crashed (%s); still serving", addr, exc)
            os.chdir(cwd)  # what the stock loop does after a normal session
            sock.close()  # tells the client at once instead of leaving it waiting

    server._serving = serve_and_survive
    host, port = args.tracker.rsplit(":", 1)
    server._popen_start_rpc_server(
        args.host, args.port, args.port_end, tracker_addr=(host, int(port)), key=args.key,
        load_library=args.load_library, custom_addr=args.custom_addr)
    while True:  # the listen loop runs in a daemon thread
        time.sleep(3600)


if __name__ == "__main__":
    main()
