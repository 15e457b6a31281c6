"""`python -m producer submit|status|wait`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleet.contract import SCHEDULERS, JobStatus
from fleet.errors import (
    BrokerMisconfigured,
    BrokerRefused,
    BrokerUnavailable,
    FleetError,
    JobValidationError,
)
from fleet.settings import ProducerSettings
from producer.client import MAX_DEADLINE_S, Client

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_BROKER = 0, 1, 2, 3, 4
#: Up to this many jobs, `wait` shows one progress bar per job; above, one bar for all.
MAX_JOB_BARS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Submit text-to-image jobs to a diffusion-fleet and follow them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="validate and enqueue one job per prompt")
    s.add_argument("prompts", nargs="*", metavar="PROMPT")
    s.add_argument("--file", help="read prompts from FILE, one a line ('-' for stdin)")
    s.add_argument("--negative", default="", help="negative prompt for every job")
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--seed", help="unsigned 64-bit seed (image i uses seed+i); default random")
    s.add_argument("--images-per-prompt", type=int, default=1, dest="images")
    s.add_argument("--model", help="model name (default: the worker's model)")
    s.add_argument("--scheduler", default="default", help=f"one of: {', '.join(SCHEDULERS)}")
    s.add_argument("--job-id", help="your own job id (one prompt only); resubmitting it is a no-op")
    s.add_argument("--priority", type=int, default=5, help="0 (last) to 9 (first); default 5")
    s.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="a job not started within this many seconds is not run (above 0, at most "
        f"{MAX_DEADLINE_S} = 30 days)",
    )
    s.add_argument("--wait", action="store_true", help="wait for the jobs and print their images")
    _add_wait_options(s)

    st = sub.add_parser("status", help="show the state of jobs")
    st.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    st.add_argument("--json", action="store_true", help="print JSON")

    rp = sub.add_parser("replay", help="submit a stored recipe again as a new job")
    rp.add_argument("source", metavar="MANIFEST_KEY_OR_FILE")
    rp.add_argument("--index", type=int, help="replay only this image of the job")
    rp.add_argument("--wait", action="store_true", help="wait and print the new images")
    _add_wait_options(rp)

    g = sub.add_parser("gallery", help="an HTML page and a contact sheet of jobs' images")
    g.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    g.add_argument("--output", type=Path, required=True, help="folder for index.html")

    st2 = sub.add_parser("stats", help="queue depths and workers with their device and job")
    st2.add_argument("--json", action="store_true", help="print JSON")

    c = sub.add_parser("cancel", help="cancel jobs: queued ones never run, running ones stop")
    c.add_argument("job_ids", nargs="+", metavar="JOB_ID")

    f = sub.add_parser("failed", help="list failed jobs with their reasons")
    f.add_argument("--limit", type=int, help="show at most this many (newest first)")
    f.add_argument("--all", action="store_true", help="include failures already retried")
    f.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser("retry", help="submit failed jobs again with their recorded recipe")
    r.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    r.add_argument("--json", action="store_true", help="print JSON")

    w = sub.add_parser("wait", help="wait for jobs to finish and print their images")
    w.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    _add_wait_options(w)

    sv = sub.add_parser("serve", help="run the HTTP gateway (OpenAI-compatible images, jobs)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="gateway processes (uvicorn workers)")

    k = sub.add_parser("keys", help="the gateway's API keys: create, list, revoke")
    ks = k.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="make a key for a tenant and print it (once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--label", default="", help="a note to tell keys apart")
    kl = ks.add_parser("list", help="list keys (ids, tenants, labels; never the keys)")
    kl.add_argument("--tenant")
    kr = ks.add_parser("revoke", help="revoke a key by its id: it stops working at once")
    kr.add_argument("key_id")
    kw = ks.add_parser("webhook-secret", help="print a tenant's webhook signing secret")
    kw.add_argument("--tenant", required=True)

    t = sub.add_parser("tenants", help="the gateway's tenants and their limits")
    ts = t.add_subparsers(dest="tenants_command", required=True)
    tset = ts.add_parser("set", help="create a tenant or change its limits")
    tset.add_argument("name")
    tset.add_argument("--models", help="comma-separated models it may use ('*': any)")
    tset.add_argument("--rate", type=int, dest="rate_per_min", help="jobs per minute (0: none)")
    tset.add_argument("--max-queued", type=int, help="jobs waiting at once (0: no cap)")
    tset.add_argument("--max-job", type=float, dest="max_job_mpx_steps",
                      help="largest job: megapixels x steps x images (0: no cap)")  # fmt: skip
    tset.add_argument("--max-priority", type=int, help="highest priority its jobs get (0-9)")
    ts.add_parser("list", help="list tenants and their limits")
    return parser


def _add_wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, help="download the images into this folder")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        text = read_prompt_file(args.file)
        prompts += [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
    return prompts


def read_prompt_file(name: str) -> str:
    """The text of ``--file`` (``-``: stdin), UTF-8; JobValidationError naming the line and
    column of the first byte that is not UTF-8, or why the file cannot be read."""
    try:
        if name == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            data = stdin.read() if stdin is not None else sys.stdin.read().encode()
        else:
            data = Path(name).read_bytes()
    except OSError as exc:
        reason = f"cannot be read: {exc.strerror or exc}"
        raise JobValidationError([("--file", name, reason)]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobValidationError([("--file", name, not_utf8(data, exc))]) from None


def not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where ``data`` stops being UTF-8 (line and column counted from 1), and what to do."""
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    bad = " ".join(f"0x{b:02x}" for b in data[exc.start : exc.end])
    return (
        f"line {line}, byte {column}: {bad} is not UTF-8 ({exc.reason}); save the file as "
        "UTF-8 (e.g. iconv -f <its encoding> -t utf-8), or fix that line; nothing was submitted"
    )


def jobs_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = read_prompts(args)
    if not prompts:
        raise JobValidationError([("prompt", None, "give at least one PROMPT or --file")])
    if args.job_id and len(prompts) != 1:
        raise JobValidationError([("job_id", args.job_id, "--job-id needs exactly one prompt")])
    jobs = []
    for prompt in prompts:
        job: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": args.negative,
            "width": args.width,
            "height": args.height,
            "steps": args.steps,
            "guidance": args.guidance,
            "images": args.images,
            "scheduler": args.scheduler,
        }
        for key, value in (("seed", args.seed), ("model", args.model), ("job_id", args.job_id)):
            if value is not None:
                job[key] = value
        jobs.append(job)
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command in ("serve", "keys", "tenants"):
            from producer.gateway import admin  # the gateway's parts load only for its commands

            return admin.run(args, out)
        with Client(ProducerSettings()) as client:
            if args.command == "submit":
                return cmd_submit(client, args, out, err)
            if args.command == "status":
                return cmd_status(client, args, out)
            if args.command == "replay":
                handle = client.replay(args.source, args.index)
                if args.wait:
                    return cmd_wait(client, [handle.job_id], args, out, err)
                out.print(handle.job_id)
                return EXIT_OK
            if args.command == "gallery":
                from producer.gallery import write_gallery

                page, sheet = write_gallery(client, args.job_ids, args.output)
                out.print(f"gallery: {page}\ncontact sheet: {sheet}")
                return EXIT_OK
            if args.command == "stats":
                return cmd_stats(client, args, out)
            if args.command == "cancel":
                for job_id in args.job_ids:
                    client.cancel(job_id)
                    out.print(f"{job_id}  cancel requested")
                return EXIT_OK
            if args.command == "failed":
                return cmd_failed(client, args, out)
            if args.command == "retry":
                return cmd_retry(client, args, out)
            return cmd_wait(client, args.job_ids, args, out, err)
    except JobValidationError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_INVALID
    except TimeoutError as exc:
        err.print(f"[yellow]timeout:[/yellow] {escape(str(exc))}")
        return EXIT_TIMEOUT
    except (BrokerRefused, BrokerUnavailable, BrokerMisconfigured) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return EXIT_BROKER
    except FleetError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_FAILED


def cmd_submit(client: Client, args: argparse.Namespace, out: Console, err: Console) -> int:
    handles = client.submit_many(
        jobs_from_args(args), deadline_s=args.deadline, priority=args.priority
    )
    if not args.wait:
        if args.json:
            out.print_json(
                data=[
                    {"job_id": h.job_id, "queue": h.queue, "duplicate": h.duplicate}
                    for h in handles
                ]
            )
        else:
            for h in handles:
                note = "  (already submitted; not enqueued again)" if h.duplicate else ""
                out.print(f"{h.job_id}{note}")
        return EXIT_OK
    return cmd_wait(client, [h.job_id for h in handles], args, out, err)


def cmd_stats(client: Client, args: argparse.Namespace, out: Console) -> int:
    from rich.table import Table

    data = client.stats()
    if args.json:
        out.print_json(data=data)
        return EXIT_OK
    queues = Table("queue", "waiting", title="queues")
    for name, depth in data["queues"].items():
        queues.add_row(name, str(depth))
    out.print(queues)
    workers = Table("worker", "queues", "device", "model", "running", title="workers")
    for w in data["workers"]:
        device = (w["device"] or "?") + (f" ({w['gpu_name']})" if w.get("gpu_name") else "")
        workers.add_row(w["node"], ",".join(w["queues"]), device, w["model"] or "?",
                        ", ".join(w["active"]) or "-")  # fmt: skip
    out.print(workers)
    return EXIT_OK


def cmd_failed(client: Client, args: argparse.Namespace, out: Console) -> int:
    entries = client.failed(limit=args.limit, include_retried=args.all)
    if args.json:
        out.print_json(data=entries)
    else:
        for e in entries:
            name = e.get("job_id") or "(no task id)"
            out.print(f"[red]failed[/red] {name}  {e.get('failed_at') or ''}")
            out.print(f"  reason: {e.get('error')}")
            if e.get("retried_as"):
                out.print(f"  retried as: {e['retried_as']}")
        if not entries:
            out.print("no failed jobs")
    return EXIT_OK


def cmd_retry(client: Client, args: argparse.Namespace, out: Console) -> int:
    handles = [client.retry(job_id) for job_id in args.job_ids]
    if args.json:
        out.print_json(data=[{"job_id": h.job_id, "queue": h.queue} for h in handles])
    else:
        for h in handles:
            out.print(f"{h.job_id}  (retry) submitted to {h.queue}")
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: Console) -> int:
    statuses = client.with_queue_positions([client.status(job_id) for job_id in args.job_ids])
    if args.json:
        out.print_json(data=[s.model_dump(mode="json") for s in statuses])
    else:
        for s in statuses:
            print_status(out, s)
    return EXIT_OK


def cmd_wait(
    client: Client, job_ids: list[str], args: argparse.Namespace, out: Console, err: Console
) -> int:
    per_job = len(job_ids) <= MAX_JOB_BARS
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        # One bar per job that moves with its denoising steps, or one bar for many jobs.
        overall = progress.add_task("jobs", total=len(job_ids), state="", visible=not per_job)
        bars = {
            j: progress.add_task(j[:12], total=1, state="queued", visible=per_job) for j in job_ids
        }

        def on_update(st: JobStatus) -> None:
            bar = bars[st.job_id]
            if st.done:
                progress.advance(overall)
                total = progress.tasks[bar].total or 1
                progress.update(bar, completed=total, state=st.state)
            elif st.steps:
                progress.update(bar, total=st.steps, completed=st.step or 0, state=st.state)
            else:
                ahead = f", {st.ahead} ahead" if st.ahead is not None else ""
                progress.update(bar, state=st.state + ahead)
            if progress.disable and not args.json:  # no terminal: one line per change
                line = f"{st.job_id}: {st.state}" + (f" ({st.detail})" if st.detail else "")
                progress.console.print(line)

        statuses = client.wait(job_ids, timeout=args.timeout, on_update=on_update)

    downloads: dict[str, list[str]] = {}
    if args.output:
        for st in statuses:
            if st.result is not None and st.state == "succeeded":
                downloads[st.job_id] = [str(p) for p in client.download(st.result, args.output)]
    if args.json:
        data = []
        for st in statuses:
            item = st.model_dump(mode="json")
            item["files"] = downloads.get(st.job_id, [])
            data.append(item)
        out.print_json(data=data)
    else:
        for st in statuses:
            print_status(out, st, downloads.get(st.job_id, []))
    return EXIT_FAILED if any(s.state == "failed" for s in statuses) else EXIT_OK


def print_status(out: Console, st: JobStatus, files: list[str] | None = None) -> None:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "magenta"}.get(st.state, "yellow")
    line = f"[{colour}]{st.state}[/{colour}] {st.job_id}"
    if st.detail:
        line += f" ({st.detail})"
    out.print(line)
    if st.result is None:
        return
    if st.result.error:
        out.print(f"  reason: {st.result.error}")
    bucket = st.result.bucket or "?"
    for i, record in enumerate(st.result.images):
        out.print(f"  s3://{bucket}/{record.key}  seed={record.seed}")
        if record.url:
            out.print(f"    url: {record.url}")
        if files and i < len(files):
            out.print(f"    file: {files[i]}")
