"""Command line: `python -m egrpo_backend {plan,train,run,resume,cancel,export,status,rewards} ...`."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from . import job_process  # light (no torch): the job's lock is taken before anything slow loads
from .cancel import ACK_FILE, catch_early_sigterm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local files only
if os.environ.get(job_process.LOCK_HELD_ENV) == "1" and "LOCAL_RANK" in os.environ:
    job_process.die_with_parent(parent_marker=b"torch.distributed.run")  # a rank under `--nproc-per-node`


@contextmanager
def _running_job(job_dir):
    """Hold the job's process lock for this command (a second process running the job is refused) and
    drop any cancel request when the run ends: it was addressed to this run. SIGTERM is caught first,
    so a job manager that sees the lock held may signal this process: while the model still loads, a
    SIGTERM means "cancel after the first iteration", not death by the default handler."""
    catch_early_sigterm(job_dir if job_process.holds_lock_here() else None)
    if not job_process.holds_lock_here():  # another rank, or the launching parent, holds it
        yield
        return
    try:
        lock, _ = job_process.claim(job_dir)
    except OSError as e:  # the lock file's few bytes did not fit: the job cannot even start
        _record_no_space(job_dir, e)
        raise
    try:
        yield
    finally:
        (Path(job_dir) / job_process.CANCEL_FILE).unlink(missing_ok=True)
        (Path(job_dir) / ACK_FILE).unlink(missing_ok=True)
        lock.release()


def _record_no_space(job_dir, error: OSError) -> None:
    """A full disk before the job could start: raised as DiskFull, and status.json says so (in place)."""
    from .job_files import DiskFull, is_disk_full

    if not is_disk_full(error) or isinstance(error, DiskFull):
        return
    full = DiskFull(job_dir, 4096, job_process.LOCK_FILE)
    try:
        from .job_folder import write_status

        write_status(job_dir, status="failed", pid=None, message=str(full))
    except OSError:
        pass
    raise full from error


def _launch_ranks(a) -> int:
    """`run/resume --nproc-per-node N`: hold the lock here and run N ranks with torch.distributed.run."""
    import subprocess

    with _running_job(_job_dir(a.job_dir)):
        # --standalone: a c10d rendezvous on a free port, so two jobs never collide on one port, and each
        # restart round gets fresh store keys (the static default hands restarted ranks stale peer addresses)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc_per_node}",
               f"--max-restarts={a.max_restarts}", "-m", "egrpo_backend", a.cmd, str(a.job_dir)]
        cmd += (["--until", str(a.until)] if a.until is not None else []) + (["--quiet"] if a.quiet else [])
        me = os.getpid()
        child = subprocess.Popen(cmd, env={**os.environ, job_process.LOCK_HELD_ENV: "1"}, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: job_process.die_with_parent(me))  # torchrun dies with this process
        tail = []
        for line in child.stderr:  # pass torchrun's messages on, keeping the failure summary that names the rank
            sys.stderr.write(line)
            tail = (tail + [line])[-200:]
        rc = child.wait()
        if rc:
            _record_rank_failure(Path(a.job_dir), rc, _failed_rank("".join(tail)))
        return rc


def _failed_rank(torchrun_stderr: str) -> str | None:
    """The rank of torchrun's 'Root Cause' entry ('rank      : 1 (local_rank: 1)')."""
    import re

    root = torchrun_stderr.split("Root Cause", 1)[-1]
    found = re.search(r"rank\s*:\s*(\d+)", root)
    return found.group(1) if found else None


def _record_rank_failure(job_dir: Path, rc: int, rank: str | None) -> None:
    """A rank that died without writing (e.g. SIGKILL) leaves no error event (rank 0 only sees a lost peer):
    the parent writes one naming the rank torchrun reports as the root cause."""
    from .job_folder import EventLog, read_status, write_status

    if rank is None and read_status(job_dir).get("status") == "failed":
        return  # rank 0 recorded the error itself; a dead rank named by torchrun is still recorded below
    who = f"rank {rank}" if rank is not None else "a rank (see torchrun's failure summary)"
    msg = f"{who} exited abnormally; torchrun ended with exit code {rc}; `resume` continues from the last checkpoint"
    EventLog(job_dir).emit("error", message=msg, traceback="")
    write_status(job_dir, status="failed", message=msg, pid=None)


def cmd_plan(a) -> int:
    from .schedule import build_plan, shifted_sigmas

    sigmas = [float(s) for s in a.sigmas.split(",")] if a.sigmas else shifted_sigmas(a.steps, a.shift)
    plan = build_plan(sigmas, a.eta, a.tau, a.active, a.diffusion, a.reading)
    print(json.dumps(plan.to_json(), indent=2) if a.json else plan.table())
    if a.png:
        plan.save_png(a.png)
        if not a.json:
            print(f"chart written to {a.png}")
    return 0


def cmd_train(a) -> int:
    from .config import JobSpec
    from .jobs import create_job, run_job

    spec = JobSpec.from_file(a.spec)
    create_job(spec, a.out)
    print(f"job created in {a.out}")
    with _running_job(a.out):
        return _report(run_job(a.out, until=a.until, progress=not a.quiet))


def cmd_run(a) -> int:
    _settle(a.job_dir)
    if a.nproc_per_node > 1:
        return _launch_ranks(a)
    with _running_job(_job_dir(a.job_dir)):
        from .jobs import run_job

        return _report(run_job(a.job_dir, until=a.until, progress=not a.quiet))


def cmd_resume(a) -> int:
    _settle(a.job_dir)  # a killed run's "running" is made "failed" on disk first, whatever happens next
    # The lock (not a pid that may have been reused) says whether another process runs the job; a stale
    # cancel request was dropped when the lock was taken, a fresh one (sent since this process started)
    # is honoured, so this is run_job and not jobs.resume_job.
    if a.nproc_per_node > 1:
        return _launch_ranks(a)
    with _running_job(_job_dir(a.job_dir)):
        from .jobs import run_job

        return _report(run_job(a.job_dir, until=a.until, progress=not a.quiet))


def _settle(job_dir) -> None:
    from .job_folder import settle_status

    if (Path(job_dir) / "job.json").is_file():
        settle_status(job_dir)


def _job_dir(path) -> Path:
    if not (Path(path) / "job.json").is_file():
        raise FileNotFoundError(f"{path} is not a job directory (no job.json); create one with `train SPEC --out DIR`")
    return Path(path)


def cmd_cancel(a) -> int:
    from .job_folder import request_cancel

    signalled = request_cancel(a.job_dir)  # refuses a job that is not running
    how = "" if signalled else " (through its cancel file: its process cannot be proven from here, so no signal)"
    print(f"cancel requested for {a.job_dir}{how}: it stops at its next safe point (between rollout, reward and "
          "update) and writes the checkpoint and LoRA of its last finished iteration")
    return 0


def cmd_export(a) -> int:
    from .jobs import export_job

    print(export_job(a.job_dir, a.format, out=a.out))
    return 0


def cmd_status(a) -> int:
    from .job_folder import settle_status  # a dead run reads (and is saved) as "failed: process ended"

    _job_dir(a.job_dir)
    print(json.dumps(settle_status(a.job_dir), indent=2))
    return 0


def cmd_rewards(a) -> int:
    from .rewards import reward_names

    try:
        from .rewards.models.status import reward_status
    except ImportError:
        reward_status = None
    status = {s["name"]: s for s in reward_status(a.reward_dir)} if reward_status else {}
    for name in reward_names():
        s = status.get(name)
        if s is None:
            print(f"{name:24s} ready (no weight files needed)")
        else:
            print(f"{name:24s} {'found' if s['found'] else 'missing'}: {', '.join(s['files']) or '-'}"
                  + ("" if s["found"] else f"  (searched {s['searched']}; {s['hint']})"))
    return 0


def _report(result: dict) -> int:
    print(f"status: {result['status']} after {result['iteration']} iterations")
    for path in result["lora"]:
        print(f"LoRA: {path}")
    if result["eval"]:
        first, last = result["eval"][0], result["eval"][-1]
        print(f"held-out reward: {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m egrpo_backend", description="E-GRPO training for flow-matching models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("plan", help="print the entropy plan of a schedule", description="Print the entropy plan: "
                       "per-step std and entropy score, merge widths, SDE/ODE kind.")
    s.add_argument("--steps", type=int, default=16, help="T, sampling steps (default 16)")
    s.add_argument("--shift", type=float, default=3.0, help="timestep shift s (default 3.0)")
    s.add_argument("--sigmas", default="", help="explicit comma-separated grid ending at 0 (overrides --steps/--shift)")
    s.add_argument("--eta", type=float, default=0.7, help="SDE noise level a (default 0.7)")
    s.add_argument("--tau", type=float, default=2.2, help="entropy threshold; 0 disables merging (default 2.2)")
    s.add_argument("--active", default="0-7", help="branch (trained) steps: '0-7', '0,2,4', 'all' (default 0-7)")
    s.add_argument("--diffusion", default="flow_grpo", choices=["flow_grpo", "constant"], help="diffusion coefficient form")
    s.add_argument("--reading", default="ours", choices=["ours", "variance", "eq11"],
                   help="entropy score the merges use: ours sqrt(2 pi e) g sqrt(|dt|) (training), variance "
                        "2 pi e g^2 |dt|, eq11 sigma/(1 - sigma) |dt| (docs/algorithm.md; default ours)")
    s.add_argument("--json", action="store_true", help='print {"steps": [{index, sigma, sigma_next, std, entropy, merge, kind}]}')
    s.add_argument("--png", default="", help="also write the chart to this PNG file")
    s.set_defaults(fn=cmd_plan)

    for name, fn, text in (("run", cmd_run, "run a job directory (continues from its last checkpoint)"),
                           ("resume", cmd_resume, "resume a stopped, cancelled or killed job from its last checkpoint")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("job_dir", help="job directory (holds job.json)")
        s.add_argument("--until", type=int, default=None, help="stop (resumably) after this many iterations")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this machine (torch.distributed.run); "
                       "prompts_per_iteration must be a multiple (docs/scale_out.md)")
        s.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of failed ranks (each resumes "
                       "from the last checkpoint)")
        s.set_defaults(fn=fn, cmd=name)

    s = sub.add_parser("train", help="create a job from a spec file and run it", description="Create a job "
                       "directory from a JSON spec (validated) and run it.")
    s.add_argument("spec", help="JSON job spec (see README)")
    s.add_argument("--out", required=True, help="new job directory")
    s.add_argument("--until", type=int, default=None, help="stop (resumably) after this many iterations")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("cancel", help="ask a running job to stop at its next safe point",
                       description="Stop a job at its next safe point between phases (rollout, reward, update); it "
                                   "writes the checkpoint and LoRA of its last finished iteration.")
    s.add_argument("job_dir")
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("export", help="export the job's LoRA in a format", description="Write the LoRA of the "
                       "job's latest checkpoint: kohya (lora_unet_*), peft (diffusers transformer.*), comfy (diffusion_model.*).")
    s.add_argument("job_dir")
    s.add_argument("--format", required=True, choices=["kohya", "peft", "comfy"])
    s.add_argument("--out", default=None, help="output .safetensors (default: JOB_DIR/lora/NAME[.fmt].safetensors)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("status", help="print a job's status.json", description="Print a job's status.")
    s.add_argument("job_dir")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("rewards", help="list rewards and whether their weight files were found",
                       description="List the available rewards and whether their files were found.")
    s.add_argument("--reward-dir", default=None, help="folder with reward model files (default: $EGRPO_REWARD_DIR)")
    s.set_defaults(fn=cmd_rewards)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError, FloatingPointError) as e:
        _print_error(e)
        return 2
    except OSError as e:  # a full disk (job_files.DiskFull names the folder and the bytes needed)
        if getattr(e, "errno", None) not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        _print_error(e)
        return 2


def _print_error(e: BaseException) -> None:
    """One line, printable on any terminal: a lone surrogate or a newline inside a quoted value must not
    turn the refusal into a UnicodeEncodeError or a second line."""
    text = " ".join(str(e).splitlines()).encode("utf-8", "backslashreplace").decode("utf-8")
    print(f"error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
