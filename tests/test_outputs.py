"""Outputs are never lost or half-written (issue 10).

Every path is checked before the first write, each file is written in a
hidden staging folder and renamed onto its path only when all outputs of the
run are written, and the scratch files of ``in_memory=False`` live in the
system's temporary directory. Faults are injected into the save itself (a
full disk) and into a real ``strun`` process (killed while saving).
"""

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from stdatamodels.jwst.datamodels import ImageModel

import step_helpers as h

from jwst_wiimatch.models.outputs import STAGING_PREFIX, OutputSet, OutputWarning
from jwst_wiimatch.step import WiiMatchStep

HERE = os.path.dirname(os.path.abspath(__file__))


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def folder_state(folder):
    """{name: sha256} of every file below ``folder`` (relative names)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = digest(p)
    return out


def staging_left(folder):
    return [e for e in os.listdir(folder) if e.startswith(STAGING_PREFIX)]


@pytest.fixture
def asn_run(tmp_path):
    """Three small resampled models in tmp_path/in, an association, an output folder."""
    src = tmp_path / "in"
    src.mkdir()
    models, _truths, _ref = h.make_models(n=3, shape=(40, 44), degree=1)
    asn = h.write_asn(models, src)
    out = tmp_path / "out"
    out.mkdir()
    return asn, src, out


def outputs_of(src, out):
    names = sorted(n for n in os.listdir(src) if n.endswith(".fits"))
    return [out / n.replace("_i2d.fits", "_wiimatch.fits") for n in names]


def test_outputs_written_and_nothing_else(asn_run):
    asn, src, out = asn_run
    before = folder_state(src)
    WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
    expected = outputs_of(src, out)
    assert sorted(os.listdir(out)) == sorted(p.name for p in expected)
    for p in expected:
        with ImageModel(str(p)) as m:
            assert m.meta.cal_step.wiimatch == "COMPLETE"
            assert m.meta.filename == p.name  # not the staging name
    assert folder_state(src) == before  # inputs untouched


def test_full_disk_while_saving_writes_nothing(asn_run, monkeypatch):
    """The 2nd save fails after writing half a file (ENOSPC): no output appears,
    outputs of an earlier run keep their contents, no staging folder is left."""
    asn, src, out = asn_run
    WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
    earlier = folder_state(out)
    assert len(earlier) == 3
    calls = []
    real_save = ImageModel.save

    def failing_save(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as fh:
                fh.write(b"SIMPLE  =                    T" + b" " * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(ImageModel, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device") as err:
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out), degree=0,
                          maximum_cores="none")
    assert "No output of this run was written" in str(err.value)
    assert folder_state(out) == earlier
    assert staging_left(out) == []
    # every write went to a staging folder, never to an output path
    assert all(STAGING_PREFIX in str(p) for p in calls)


def test_full_disk_fresh_folder_leaves_no_partial_set(asn_run, monkeypatch):
    asn, src, out = asn_run
    real_save = ImageModel.save
    calls = []

    def failing_save(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(ImageModel, "save", failing_save)
    with pytest.raises(OSError, match="could not write"):
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out),
                          maximum_cores="none")
    assert os.listdir(out) == []


def test_bad_output_path_found_before_any_write(asn_run, monkeypatch):
    """A folder where the 2nd output should go: refused before matching or writing."""
    asn, src, out = asn_run
    second = outputs_of(src, out)[1]
    second.mkdir()
    import jwst_wiimatch.step as step_mod

    def no_match(*a, **k):  # the check must come before any work
        raise AssertionError("matching started before the output paths were checked")

    monkeypatch.setattr(step_mod, "match_models", no_match)
    with pytest.raises(ValueError, match="is an existing folder") as err:
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
    assert second.name in str(err.value)
    assert os.listdir(out) == [second.name] and os.listdir(second) == []


def test_unwritable_output_folder_refused_before_work(asn_run, monkeypatch):
    asn, src, out = asn_run
    import jwst_wiimatch.step as step_mod

    monkeypatch.setattr(step_mod, "match_models", lambda *a, **k: 1 / 0)
    import jwst_wiimatch.models.outputs as outputs_mod

    real_access = os.access
    monkeypatch.setattr(outputs_mod.os, "access",
                        lambda p, mode: False if os.fspath(p) == str(out)
                        else real_access(p, mode))
    with pytest.raises(ValueError, match="is not writable.*output_dir"):
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
    assert os.listdir(out) == []


def test_missing_output_folder_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*output_dir"):
        OutputSet([tmp_path / "nowhere" / "o.fits"]).check()


def test_same_file_name_in_two_folders_refused(tmp_path):
    """Members a/x.fits and b/x.fits would write one output path: refuse, name both."""
    models, _t, _r = h.make_models(n=3, shape=(40, 44))
    for k, m in enumerate(models):
        folder = tmp_path / ("a" if k == 0 else "b")
        folder.mkdir(exist_ok=True)
        m.meta.filename = "same.fits" if k < 2 else "other.fits"
        m.save(str(folder / m.meta.filename))
    asn = {"asn_id": "t", "asn_pool": "t", "products": [{"name": "t", "members": [
        {"expname": str(tmp_path / "a" / "same.fits"), "exptype": "science"},
        {"expname": str(tmp_path / "b" / "same.fits"), "exptype": "science"},
        {"expname": str(tmp_path / "b" / "other.fits"), "exptype": "science"}]}]}
    asn_path = tmp_path / "asn.json"
    asn_path.write_text(json.dumps(asn))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="would both be written to") as err:
        WiiMatchStep.call(str(asn_path), save_results=True, output_dir=str(out))
    msg = str(err.value)
    assert "outputs 0" in msg and "and 1" in msg and "same_wiimatch.fits" in msg
    assert os.listdir(out) == []


def test_output_that_is_an_input_refused(tmp_path):
    src = tmp_path / "x.fits"
    src.write_bytes(b"input")
    outs = OutputSet([src, tmp_path / "y.fits"], inputs=[str(src)])
    with pytest.raises(ValueError, match="is an input file"):
        outs.check()
    assert src.read_bytes() == b"input"
    assert staging_left(tmp_path) == []


def saved_paths(monkeypatch):
    """The list of paths ImageModel.save is called with from now on."""
    seen = []
    real_save = ImageModel.save

    def spy(self, path, *args, **kwargs):
        seen.append(str(path))
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(ImageModel, "save", spy)
    return seen


def test_list_and_single_model_saves_are_atomic(tmp_path, monkeypatch):
    """Outputs of list and single-model inputs also go through the staging folder."""
    models, _t, _r = h.make_models(n=3, shape=(40, 44))
    monkeypatch.chdir(tmp_path)
    seen = saved_paths(monkeypatch)
    WiiMatchStep.call(models, save_results=True)
    WiiMatchStep.call(models[0], save_results=True, output_file="single")
    names = sorted(os.listdir(tmp_path))
    assert names == ["exp1_wiimatch.fits", "exp2_wiimatch.fits", "exp3_wiimatch.fits",
                     "single_wiimatch.fits"]
    assert len(seen) == 4 and all(STAGING_PREFIX in p for p in seen)


def keep_result(result):
    """A post-hook that changes nothing."""
    return result


def test_save_model_with_post_hook_is_atomic(tmp_path, monkeypatch):
    """With post-hooks stpipe saves (after the hooks), through our atomic save_model."""
    models, _t, _r = h.make_models(n=2, shape=(40, 44))
    monkeypatch.chdir(tmp_path)
    step = WiiMatchStep(save_results=True, post_hooks=["test_outputs.keep_result"])
    seen = saved_paths(monkeypatch)
    step.run(models)
    assert sorted(os.listdir(tmp_path)) == ["exp1_wiimatch.fits", "exp2_wiimatch.fits"]
    assert seen and all(STAGING_PREFIX in p for p in seen)


def test_run_twice_saves_twice(asn_run):
    """The step saves its outputs itself; a second run of one instance saves again."""
    asn, src, out = asn_run
    step = WiiMatchStep(save_results=True, output_dir=str(out))
    step.run(asn)
    assert step.save_results is True
    for p in outputs_of(src, out):
        p.unlink()
    step.run(asn)
    assert all(p.exists() for p in outputs_of(src, out))


def test_concurrent_runs_are_detected(tmp_path):
    """Two runs on the same outputs: the second warns at its check, and whichever
    publishes last warns that the file changed under it."""
    models, _t, _r = h.make_models(n=1, shape=(20, 20))
    first = OutputSet([tmp_path / "o.fits"])
    first.check()
    second = OutputSet([tmp_path / "o.fits"])
    with pytest.warns(OutputWarning, match=r"another run \(pid %d" % os.getpid()):
        second.check()
    first.stage(models[0], 0)
    second.stage(models[0], 0)
    first.commit()
    with pytest.warns(OutputWarning, match="written by another process"):
        second.commit()
    assert os.listdir(tmp_path) == ["o.fits"]


def test_stale_staging_folder_reported(tmp_path):
    """The staging folder of a killed run is named as such (pid no longer alive)."""
    stale = tmp_path / (STAGING_PREFIX + "dead")
    stale.mkdir()
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (stale / "owner.json").write_text(json.dumps(
        {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then",
         "outputs": ["o.fits"]}))
    with pytest.warns(OutputWarning, match="did not finish.*Remove that folder"):
        with OutputSet([tmp_path / "o.fits"]):
            pass


def test_in_memory_false_scratch_in_tmpdir(asn_run, tmp_path, monkeypatch):
    """``in_memory=False`` keeps its scratch files in TMPDIR (works from a read-only
    working directory) and removes them on every exit path."""
    import tempfile

    asn, src, out = asn_run
    scratch_root = tmp_path / "tmpdir"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    cwd = tmp_path / "readonly"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    os.chmod(cwd, 0o555)
    try:
        res = WiiMatchStep.call(asn, in_memory=False, subtract=True)
        assert res._on_disk
        with res:
            m = res.borrow(1)
            assert m.meta.background.subtracted
            res.shelve(m, 1, modify=False)
        scratch = os.listdir(scratch_root)
        assert len(scratch) == 1 and scratch[0].startswith("wiimatch_scratch_")
        del res, m
        import gc

        gc.collect()
        assert os.listdir(scratch_root) == []  # removed with the library
        # streamed save: scratch removed at the end of the run
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
        assert os.listdir(scratch_root) == []

        # an error part-way (in the match) also removes it
        import jwst_wiimatch.step as step_mod

        def boom(*a, **k):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(step_mod, "match_models", boom)
        with pytest.raises(RuntimeError, match="injected"):
            WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
        assert os.listdir(scratch_root) == []
        assert staging_left(out) == []
        assert os.listdir(cwd) == []
    finally:
        os.chmod(cwd, 0o755)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from stdatamodels.jwst.datamodels import ImageModel
    from stpipe import Step
    real = ImageModel.save
    count = [0]
    def slow_save(self, path, *a, **k):
        count[0] += 1
        if count[0] == 2:
            with open(path, "wb") as fh:
                fh.write(b"SIMPLE  =                    T")
            print("HALF-WRITTEN", flush=True)
            time.sleep(60)
        return real(self, path, *a, **k)
    ImageModel.save = slow_save
    Step.from_cmdline(["wiimatch", sys.argv[1], "--output_dir", sys.argv[2],
                       "--maximum_cores", "none", *sys.argv[3:]])
""")


def run_until_half_written(script, args, env, sig):
    """Start ``script`` with ``args``; send ``sig`` once it printed HALF-WRITTEN."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            lines.append(line)
            if "HALF-WRITTEN" in line or time.time() > deadline:
                break
        proc.send_signal(sig)
        lines.extend(proc.stdout.readlines())
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    return proc.returncode, "".join(lines[-40:])


def test_kill_while_saving_leaves_outputs_intact(asn_run, tmp_path, caplog):
    """A real strun process killed (SIGKILL) while writing its 2nd output: every
    output path keeps its earlier contents; the next run warns about the staging
    folder the killed run left and then publishes a complete set."""
    asn, src, out = asn_run
    WiiMatchStep.call(asn, save_results=True, output_dir=str(out), degree=0)
    earlier = folder_state(out)
    script = tmp_path / "killme.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=HERE)
    rc, text = run_until_half_written(script, [asn, str(out)], env, signal.SIGKILL)
    assert rc == -signal.SIGKILL, text
    left = staging_left(out)
    assert len(left) == 1
    # outputs untouched; the only new thing is the hidden staging folder
    now = {k: v for k, v in folder_state(out).items() if not k.startswith(STAGING_PREFIX)}
    assert now == earlier
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jwst_wiimatch"):
        WiiMatchStep.call(asn, save_results=True, output_dir=str(out))
    texts = [r.getMessage() for r in caplog.records if r.name.startswith("jwst_wiimatch")]
    assert any("did not finish" in t and left[0] in t for t in texts), texts
    assert staging_left(out) == left  # reported, not removed: it is not ours
    for p in outputs_of(src, out):
        with ImageModel(str(p)) as m:
            assert m.meta.cal_step.wiimatch == "COMPLETE"


def test_terminated_run_cleans_up(asn_run, tmp_path):
    """SIGTERM while saving (in_memory=false): the run exits, removes its scratch
    folder in TMPDIR and its staging folder, and publishes nothing."""
    asn, src, out = asn_run
    script = tmp_path / "termme.py"
    script.write_text(KILL_SCRIPT)
    scratch_root = tmp_path / "tmpdir"
    scratch_root.mkdir()
    env = dict(os.environ, PYTHONPATH=HERE, TMPDIR=str(scratch_root))
    rc, text = run_until_half_written(script, [asn, str(out), "--in_memory", "false"],
                                      env, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, text
    assert "terminated (SIGTERM)" in text
    assert os.listdir(out) == []
    assert os.listdir(scratch_root) == []


def test_call_on_array_says_what_is_accepted():
    with pytest.raises(TypeError, match="cannot use a ndarray as input: give an association"):
        WiiMatchStep.call(np.zeros((3, 10, 10)))


@pytest.mark.parametrize("name, root", [
    ("jw01_nrca1_cal", "jw01_nrca1"), ("x_i2d", "x"), ("x_s3d", "x"),
    ("x_a3001_crf", "x_a3001"), ("x_wiimatch", "x"), ("x-skymatch", "x"),
    ("x_CAL", "x"), ("x", "x"), ("cal", "cal"), ("x_calx", "x_calx"),
    ("my_rate_data", "my_rate_data")])
def test_known_suffix_removed(name, root):
    from jwst_wiimatch.models.outputs import remove_known_suffix

    assert remove_known_suffix(name)[0] == root
