"""The llama.cpp server process: `python -m distilflow.tasks.llama_cpp_server SETTINGS_JSON`.

xllamacpp runs llama.cpp's own HTTP server (OpenAI-compatible chat completions, GBNF grammars) inside this
process, on 127.0.0.1 and a free port. The process prints {"address": URL} once the server is up, serves
until its stdin is closed, then prints {"peak_memory_mb": ...} (its own peak resident memory) and exits.
Nothing else is imported here (fresh_process: the standard library), so that peak is the server's, not the
pipeline's libraries'.
"""

import json
import sys


def main(settings_json: str) -> None:
    import xllamacpp

    settings = json.loads(settings_json)
    params = xllamacpp.CommonParams()
    params.model.path = settings["model"]
    params.n_parallel, params.n_ctx = settings["n_parallel"], settings["n_ctx"]
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = settings["threads"]
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as err:
        sys.exit(f"xllamacpp: {err}")
    print(json.dumps({"address": server.listening_address}), flush=True)
    sys.stdin.read()
    print(json.dumps({"peak_memory_mb": peak_resident_kib() * 1024 / 1e6}), flush=True)
    del server  # stops llama.cpp's threads before the interpreter unloads its library


def peak_resident_kib() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    exec, so a server started from the pipeline's process would report the pipeline's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


if __name__ == "__main__":
    main(sys.argv[1])
