"""One writer per output folder, tested with two real processes: a second command into a folder another
live process is writing is refused with one line naming that process, and touches none of its files;
after the first process is killed (-9), the same command takes the folder over, sweeps the killed run's
temporaries and finishes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from crosslayer.cli import main
from crosslayer.io import LOCK_FILE, claim_folder, release_folder, sweep_temporaries
from crosslayer.store import ActivationStore

from conftest import make_toy_corpus

# Runs the real CLI in a child process, with one function replaced by one that leaves a temporary
# file (as a half-written shard or checkpoint would be) in the output folder and then blocks.
CHILD = textwrap.dedent("""
    import importlib, json, pathlib, sys, time
    module, attr, tmp, argv = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    def block(*args, **kwargs):
        pathlib.Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(tmp).write_text("half written")
        print("blocked", flush=True)
        time.sleep(600)
    setattr(importlib.import_module(module), attr, block)
    from crosslayer.cli import main
    sys.exit(main(argv))
""")
HARVEST = ["harvest", "--model", "tiny-2l-64d", "--tokens", "1k", "--seq-len", "32"]
TRAIN = ["--width", "16", "--k", "2", "--tokens", "512", "--batch-size", "64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_toy_corpus(tmp_path_factory.mktemp("corpus") / "toy.jsonl", n_docs=120))


def _blocked_child(module, attr, tmp, argv):
    """Start the child and wait until it holds the folder (and has left ``tmp``)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, module, attr, str(tmp), json.dumps(argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # (the model loader prints first)
        if line.strip() == "blocked":
            return proc
    raise AssertionError(proc.stderr.read())


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _refused(argv, proc, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"process {proc.pid}" in err[0], err


CASES = {  # verb -> (module, function the child blocks in, argv builder of (store, corpus, out), temporary)
    "harvest": ("crosslayer.harvest", "_run_shards", lambda s, c, o: HARVEST + ["--corpus", c, "--out", o],
                "shards/.shard-00000.acts.npy.abc.tmp"),
    "train-crosscoder": ("crosslayer.training", "_train_step",
                         lambda s, c, o: ["train-crosscoder", "--store", s, "--out", o, *TRAIN],
                         ".checkpoint.pt.abc.tmp"),
    "train-saes": ("crosslayer.training", "_train_step",
                   lambda s, c, o: ["train-saes", "--store", s, "--out", o, *TRAIN], ".checkpoint.pt.abc.tmp"),
    "reproduce": ("studies.pipeline", "_run_step",
                  lambda s, c, o: ["reproduce", "--preset", "micro", "--corpus", c, "--out", o], ".preset.json.abc.tmp"),
}


@pytest.mark.parametrize("verb", sorted(CASES))
def test_a_second_writer_is_refused_and_leaves_the_first_ones_files(verb, tiny_store, corpus, tmp_path, capsys):
    module, attr, build, tmp = CASES[verb]
    out = tmp_path / "out"
    argv = [str(a) for a in build(str(tiny_store.path), corpus, str(out))]
    proc = _blocked_child(module, attr, out / tmp, argv)
    try:
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        _refused(argv, proc, capsys)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        assert (out / tmp).read_text() == "half written"
    finally:
        _kill(proc)


@pytest.mark.parametrize("verb", ["harvest", "train-crosscoder"])
def test_a_killed_writers_folder_is_taken_over(verb, tiny_store, corpus, tmp_path, capsys):
    module, attr, build, tmp = CASES[verb]
    out = tmp_path / "out"
    argv = [str(a) for a in build(str(tiny_store.path), corpus, str(out))]
    _kill(_blocked_child(module, attr, out / tmp, argv))
    assert (out / LOCK_FILE).is_file() and (out / tmp).is_file()  # what kill -9 leaves
    assert main(argv) == 0
    assert not (out / tmp).exists(), "the killed run's temporary was not swept"
    if verb == "harvest":
        ActivationStore(out).verify()
    else:
        assert json.loads((out / "cfg.json").read_text())["status"] == "complete"


def test_the_lock_is_released_when_the_job_ends_and_taken_again(tmp_path):
    """In one process, a finished job's folder can be claimed again by another process at once."""
    out = tmp_path / "job"
    assert claim_folder(out, {"a": 1}, record="plan.json", what="job") is None
    release_folder(out)
    code = ("from crosslayer.io import claim_folder; import sys; "
            f"sys.exit(0 if claim_folder({str(out)!r}, {{'a': 1}}, record='plan.json', what='job') else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sweep_leaves_subfolders_claimed_by_other_jobs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "own").mkdir()
    for path in (tmp_path / ".a.tmp", tmp_path / "own" / ".b.tmp", tmp_path / "sub" / ".c.tmp"):
        path.write_text("x")
    (tmp_path / "sub" / LOCK_FILE).write_text("")
    (tmp_path / "keep.tmp").write_text("not a temporary of atomic_path")
    sweep_temporaries(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(["keep.tmp", f"sub/{LOCK_FILE}", "sub/.c.tmp"])


def test_written_files_respect_the_umask(tmp_path):
    from crosslayer.io import write_json

    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
