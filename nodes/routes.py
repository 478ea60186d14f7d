"""REST routes under /egrpo/ (ComfyUI also serves each under /api/egrpo/).

  GET    /egrpo/jobs                         list of job summaries (newest first)
  GET    /egrpo/jobs/{job}                   one summary
  GET    /egrpo/jobs/{job}/events?offset=N   events from byte N, and the next offset
  GET    /egrpo/jobs/{job}/metrics           curves for the panel (nodes/job_view.py): train (reward, components,
                                             clip fraction, KL, grad norm, lr, phases), eval, before/after, plan
  POST   /egrpo/jobs/{job}/cancel            ?force=1 kills at once
  POST   /egrpo/jobs/{job}/resume
  DELETE /egrpo/jobs/{job}
  GET    /egrpo/jobs/{job}/files/{path}      only the files in SERVED below (plots, sample grids, LoRAs)
The files route serves an allow-list: never job.json, status, events, logs or prompt files (they may
hold copies of user-provided files; the panel reads summaries through the other routes). Every id and file name is checked (letters, digits, . _ - only, no '..'); a bad one is HTTP 400, an
unknown job 404, a request the job's state refuses 409. Nothing outside the jobs folder is reachable.
"""

from __future__ import annotations

from aiohttp import web

from .job_manager import JobError, JobManager

PREFIX = "/egrpo"
SERVED = {  # (folder inside the job, file name suffix) -> content type; anything else is a 404
    ("", "plan.png"): "image/png", ("", "reward_curve.png"): "image/png", ("", "metrics.json"): "application/json",
    ("", "before_after.png"): "image/png", ("", "before_after.webp"): "image/webp",  # the fixed-seed grid (video: WebP)
    ("samples", ".png"): "image/png", ("lora", ".safetensors"): "application/octet-stream",
    ("samples", ".webp"): "image/webp",  # a video model's samples: animated WebP
}


def served_type(rel: str) -> str:
    """The content type of a job file the routes serve; FileNotFoundError (404) for any other file."""
    folder, _, name = rel.rpartition("/")
    for (where, suffix), kind in SERVED.items():
        if folder == where and name.endswith(suffix) and (where or name == suffix):
            return kind
    raise FileNotFoundError(f"{rel!r} is not a file the routes serve (plots, samples/*.png|webp, lora/*.safetensors)")


def _guard(fn):
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except FileNotFoundError as e:
            return web.json_response({"error": str(e)}, status=404)
        except JobError as e:
            return web.json_response({"error": str(e)}, status=409)
        except ValueError as e:  # bad id / name / path (check_name, safe_join) or a bad query value
            return web.json_response({"error": str(e)}, status=400)

    return handler


def add_routes(routes: web.RouteTableDef, manager_fn) -> None:
    """Register the handlers on a RouteTableDef; manager_fn() returns the JobManager (looked up per request)."""

    def m() -> JobManager:
        return manager_fn()

    @routes.get(f"{PREFIX}/jobs")
    @_guard
    async def list_jobs(request):
        return web.json_response({"jobs": m().list()})

    @routes.get(PREFIX + "/jobs/{job}")
    @_guard
    async def get_job(request):
        return web.json_response(m().get(request.match_info["job"]))

    @routes.get(PREFIX + "/jobs/{job}/events")
    @_guard
    async def job_events(request):
        offset = int(request.query.get("offset", "0"))
        events, new_offset = m().events(request.match_info["job"], offset)
        return web.json_response({"events": events, "offset": new_offset})

    @routes.get(PREFIX + "/jobs/{job}/metrics")
    @_guard
    async def job_metrics(request):
        return web.json_response(m().metrics(request.match_info["job"]))

    @routes.post(PREFIX + "/jobs/{job}/cancel")
    @_guard
    async def cancel_job(request):
        force = request.query.get("force", "0") in ("1", "true")
        return web.json_response(m().cancel(request.match_info["job"], force=force))

    @routes.post(PREFIX + "/jobs/{job}/resume")
    @_guard
    async def resume_job(request):
        job = m().resume(request.match_info["job"])
        return web.json_response(m().get(job))

    @routes.delete(PREFIX + "/jobs/{job}")
    @_guard
    async def delete_job(request):
        m().delete(request.match_info["job"])
        return web.json_response({"deleted": request.match_info["job"]})

    @routes.get(PREFIX + "/jobs/{job}/files/{path:.+}")
    @_guard
    async def job_file(request):
        rel = request.match_info["path"]
        path = m().file(request.match_info["job"], rel)  # 400 for a bad name first, as before
        kind = served_type(rel)
        return web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "no-cache"})


def make_app(manager: JobManager) -> web.Application:
    """A standalone app with the routes (tests; ComfyUI uses PromptServer.instance.routes)."""
    routes = web.RouteTableDef()
    add_routes(routes, lambda: manager)
    app = web.Application()
    app.add_routes(routes)
    return app
