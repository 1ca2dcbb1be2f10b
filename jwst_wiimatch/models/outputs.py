"""Saving a set of output models safely: checked first, written atomically, all or none.

`OutputSet` owns the output paths of one run:

* `OutputSet.check` looks at every path before anything is written: two
  outputs on one path, an output that would overwrite an input file, a missing
  or read-only folder, a path that is a folder. It also notices another run
  writing the same outputs into the same folder (or the remains of one that
  was killed) and warns.
* `OutputSet.stage` saves one model under its final file name inside a hidden
  staging folder (``.wiimatch-staging-*``) next to the outputs, so a full disk
  or a kill leaves no truncated file under an output name. It can run in
  worker threads or dask tasks (the object pickles).
* `OutputSet.commit` renames every staged file onto its output path once all
  of them are written (``os.replace``: atomic within a file system); until
  then existing files keep their previous contents. `OutputSet.discard`
  (also on any error inside ``with``) removes the staging folders.
"""

import json
import logging
import os
import shutil
import socket
import time
import uuid
import warnings

__all__ = ["OutputSet", "OutputWarning", "STAGING_PREFIX", "KNOWN_SUFFIXES",
           "remove_known_suffix", "save_atomically"]

log = logging.getLogger(__name__)

#: Name prefix of the hidden folders in which outputs are written before
#: they are renamed onto their final paths.
STAGING_PREFIX = ".wiimatch-staging-"
_OWNER = "owner.json"


#: File name suffixes of JWST products and of the steps that write them, which
#: output names replace (as jwst does: ``x_cal.fits`` -> ``x_wiimatch.fits``).
KNOWN_SUFFIXES = frozenset("""
    uncal ramp rate rateints trapsfilled cal calints bsub bsubints mbsub crf crfints
    i2d s2d s3d x1d x1dints c1d cat segm median blot psfalign psfstack psfsub
    assign_wcs flat_field photom resample resample_spec skymatch tweakreg
    outlier_detection cube_build master_background bkg_subtract
    wiimatch wiimatch_sky
""".split())


def remove_known_suffix(name):
    """Split ``name`` (no extension) into (root, separator) when it ends in a known suffix.

    ``'jw01_nrca1_cal'`` gives ``('jw01_nrca1', '_')``; a name without a
    known suffix is returned whole, with ``'_'`` (the signature of
    `stpipe.Step.remove_suffix`).
    """
    for sep in ("_", "-"):
        for suffix in sorted(KNOWN_SUFFIXES, key=len, reverse=True):
            tail = sep + suffix
            if name.lower().endswith(tail) and len(name) > len(tail):
                return name[: -len(tail)], sep
    return name, "_"


class OutputWarning(UserWarning):
    """Something about the output paths the user should know (see the message)."""


def _stat_key(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True
    return True


class OutputSet:
    """The outputs of one run (see the module docstring).

    Parameters
    ----------
    paths : sequence of str
        Output path of each model, in model order.
    sources : sequence of str, optional
        What each output is made from (e.g. the member's file name), used in
        messages; default ``'output <k>'``.
    inputs : sequence of str, optional
        Input files that must never be overwritten.

    Examples
    --------
    >>> outs = OutputSet(["a_wiimatch.fits", "b_wiimatch.fits"])  # doctest: +SKIP
    >>> with outs:                                                 # doctest: +SKIP
    ...     for k, model in enumerate(models):
    ...         outs.stage(model, k)
    ...     outs.commit()
    """

    def __init__(self, paths, sources=None, inputs=()):
        self.paths = [os.path.abspath(os.fspath(p)) for p in paths]
        self.sources = (list(sources) if sources is not None
                        else [f"output {k}" for k in range(len(self.paths))])
        self.inputs = [os.path.abspath(os.fspath(p)) for p in inputs if p]
        self.staging = {}  # output folder -> staging folder
        self._before = {}
        self._checked = False

    def __len__(self):
        return len(self.paths)

    # ------------------------------------------------------------------
    def check(self):
        """Check every output path and create the staging folders.

        Raises
        ------
        ValueError
            Naming the output, what it is made from and what to change, when
            two outputs share a path, an output is an input file, an output
            path is a folder, or its folder is missing or not writable.
        """
        seen = {}
        for k, path in enumerate(self.paths):
            if path in seen:
                j = seen[path]
                raise ValueError(
                    f"outputs {j} ({self.sources[j]}) and {k} ({self.sources[k]}) would "
                    f"both be written to {path}, and one would be lost: give the members "
                    "distinct file names, or match them in separate runs with different "
                    "--output_dir"
                )
            seen[path] = k
        inputs = {os.path.realpath(p) for p in self.inputs}
        for k, path in enumerate(self.paths):
            what = f"output {k} ({self.sources[k]}) {path}"
            if os.path.realpath(path) in inputs:
                raise ValueError(
                    f"{what} is an input file and would be overwritten; choose another "
                    "--output_dir (or output suffix)"
                )
            if os.path.isdir(path):
                raise ValueError(f"{what} is an existing folder; remove it or choose "
                                 "another --output_dir")
            if os.path.lexists(path) and not os.path.isfile(path):
                raise ValueError(f"{what} exists and is not a regular file; remove it "
                                 "or choose another --output_dir")
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                raise ValueError(f"the folder of {what} does not exist; create it or "
                                 "set --output_dir to an existing folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"the folder of {what} is not writable; set "
                                 "--output_dir to a folder you can write to")
        self._warn_other_runs()
        self._before = {p: _stat_key(p) for p in self.paths}
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        for folder in sorted({os.path.dirname(p) for p in self.paths}):
            stage = os.path.join(folder, STAGING_PREFIX + uuid.uuid4().hex[:12])
            try:
                os.mkdir(stage)
                owner = {"pid": os.getpid(), "host": socket.gethostname(),
                         "started": started,
                         "outputs": [os.path.basename(p) for p in self.paths
                                     if os.path.dirname(p) == folder]}
                with open(os.path.join(stage, _OWNER), "w") as fh:
                    json.dump(owner, fh)
            except OSError as exc:
                self.discard()
                raise ValueError(f"cannot write in the output folder {folder} ({exc}); "
                                 "set --output_dir to a folder you can write to") from None
            self.staging[folder] = stage
        self._checked = True

    def _warn_other_runs(self):
        """Warn about staging folders of other runs that write the same outputs."""
        host = socket.gethostname()
        for folder in sorted({os.path.dirname(p) for p in self.paths}):
            ours = {os.path.basename(p) for p in self.paths if os.path.dirname(p) == folder}
            try:
                entries = [e for e in os.listdir(folder) if e.startswith(STAGING_PREFIX)]
            except OSError:
                continue
            for entry in sorted(entries):
                stage = os.path.join(folder, entry)
                try:
                    with open(os.path.join(stage, _OWNER)) as fh:
                        owner = json.load(fh)
                except (OSError, ValueError):
                    owner = {}
                common = sorted(ours & set(owner.get("outputs") or os.listdir(stage)))
                if not common:
                    continue
                names = ", ".join(common[:3]) + (", ..." if len(common) > 3 else "")
                who = (f"pid {owner.get('pid')} on {owner.get('host')}, started "
                       f"{owner.get('started')}") if owner else "unknown owner"
                if owner.get("host") == host and not _pid_alive(owner.get("pid")):
                    msg = (f"{stage} was left by a run that did not finish ({who}); its "
                           f"files ({names}) were never published. Remove that folder.")
                else:
                    msg = (f"another run ({who}) is writing the same outputs ({names}) in "
                           f"{folder}: whichever finishes last replaces the other's files. "
                           "Run them one after the other, or with different --output_dir.")
                log.warning(msg)
                warnings.warn(msg, OutputWarning, stacklevel=3)

    # ------------------------------------------------------------------
    def staged_path(self, index):
        """Where output ``index`` is written before `commit`."""
        path = self.paths[index]
        return os.path.join(self.staging[os.path.dirname(path)], os.path.basename(path))

    def stage(self, model, index):
        """Save ``model`` as output ``index`` in the staging folder; return the final path."""
        if not self._checked:
            raise RuntimeError("OutputSet.check() must run before stage()")
        target = self.staged_path(index)
        try:
            model.save(target)
        except Exception as exc:
            raise OSError(
                f"could not write {self.paths[index]} ({self.sources[index]}): "
                f"{type(exc).__name__}: {exc}. No output of this run was written; "
                "existing files are unchanged"
            ) from exc
        log.debug("wiimatch: wrote %s (staged for %s)", target, self.paths[index])
        return self.paths[index]

    __call__ = stage  # an ``after(model, index)`` for apply_outcomes

    def commit(self):
        """Rename every staged output onto its path; return the list of paths."""
        missing = [p for k, p in enumerate(self.paths)
                   if not os.path.isfile(self.staged_path(k))]
        if missing:
            raise RuntimeError(f"outputs not written before commit: {missing}")
        done = []
        try:
            for k, path in enumerate(self.paths):
                if _stat_key(path) != self._before.get(path):
                    msg = (f"{path} was written by another process while this run was "
                           "working; it is replaced by this run's output")
                    log.warning(msg)
                    warnings.warn(msg, OutputWarning, stacklevel=2)
                os.replace(self.staged_path(k), path)
                done.append(path)
                log.info("Saved model in %s", path)
        except OSError as exc:
            raise OSError(
                f"could not move the finished outputs into place ({exc}); written: "
                f"{done or 'none'}; still in the staging folders: "
                f"{sorted(self.staging.values())}"
            ) from exc
        self.discard()
        return list(self.paths)

    def discard(self):
        """Remove the staging folders (and anything staged but not committed)."""
        for stage in self.staging.values():
            shutil.rmtree(stage, ignore_errors=True)
        self.staging = {}
        self._checked = False

    def __enter__(self):
        if not self._checked:
            self.check()
        return self

    def __exit__(self, *exc):
        self.discard()
        return False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_before"] = {}
        return state


def save_atomically(model, path, source=None):
    """Save one model to ``path`` through an `OutputSet` (checked, atomic)."""
    with OutputSet([path], sources=[source or os.path.basename(path)]) as outs:
        outs.stage(model, 0)
        return outs.commit()[0]
