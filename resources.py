"""What the scripts fetch from the network, and the one message they give when they cannot.

train_gpt2.py, train_vit.py and reproduce.py gather their inputs the same way:
- a local file or folder named by a flag is used as it is, without a look at the network;
- otherwise the Hugging Face cache is tried first, and the network is probed once, on the first need,
  with one TCP connection to the Hugging Face Hub (3 s at most), so an offline run never sits through a
  library's retries;
- every input is tried before any is reported: one message lists all that could not be had, each with the
  flag that replaces it.

    got = fetch_all({"bpe": lambda online: get_tokenizer(args.bpe_dir, online),
                     "e2e": lambda online: load_e2e(args.data_dir, online)})
"""
import socket

HUB_HOST = "huggingface.co"


class Missing(SystemExit):
    """An input neither on disk nor downloadable; the text names it, why, and the flag that replaces it.
    A SystemExit, so a script that meets one outside fetch_all still ends with its text, not a traceback."""


def network_ok(host=HUB_HOST, timeout=3.0):
    """One quick probe: can a TCP connection to the Hugging Face Hub be opened?"""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class Online:
    """network_ok(), probed on the first call only and remembered."""

    def __init__(self):
        self.ok = None

    def __call__(self):
        if self.ok is None:
            self.ok = network_ok()
        return self.ok


def fetch_all(jobs):
    """{name: job(online)} -> {name: result}. Every job runs; the Missing ones are gathered into one
    SystemExit that names them all."""
    online, got, missing = Online(), {}, []
    for name, job in jobs.items():
        try:
            got[name] = job(online)
        except Missing as e:
            missing.append(f"  {e.code}")
    if missing:
        why = f"no network (could not reach {HUB_HOST})" if online.ok is False else "a download failed"
        raise SystemExit(f"error: {why}; these could not be fetched:\n" + "\n".join(missing))
    return got
