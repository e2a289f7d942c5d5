"""Running `segment` or `auto` over the cases of an input: one file, a DICOM folder, or a folder of images.

One engine (one model load) serves every case. A single case behaves as the command always did (its errors are
the command's errors); in a folder run each failing case is one `error: case NAME: ...` line, the other cases go
on, and the exit status is 1 if any failed. Next to every output OUT.seg.nrrd the run record OUT.json says how it
was made (tool, model and adapter digests, normalisation, prompts, device, volumes, predicted quality, time).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from .common import engine_for_args, log_notices, progress_bar

log = logging.getLogger("segmote_core.cli")


def add_io_options(parser) -> None:
    """Input and output of segment/auto: the positional IMAGE or -i, and -o/--out."""
    parser.add_argument("image", nargs="?", help="NIfTI, NRRD, MHA file, DICOM series folder, or a folder of images "
                        "(one case each; nnU-Net imagesTs/ with _0000 channel suffixes too); same as -i")
    parser.add_argument("-i", "--input", metavar="PATH", help="the input, as IMAGE")
    parser.add_argument("-o", "--out", "--output", dest="out", required=True, metavar="OUT",
                        help="OUT.seg.nrrd (Slicer), a label map (.nii.gz, .nrrd) or a DICOM SEG (.dcm); for a folder "
                             "of cases, a folder that receives one CASE.seg.nrrd (or the --output-format's file) per "
                             "case")
    parser.add_argument("--statistics", action="store_true",
                        help="print a per-segment table (voxels, volume in ml, mean and std intensity) and add it "
                             "to the run record OUT.json")
    parser.add_argument("--preview", nargs="?", const="", metavar="PNG",
                        help="write an axial + coronal overlay picture (default OUT.png beside each output; "
                             "for a folder of cases PNG names a folder)")
    parser.set_defaults(usage_error=parser.error)  # exit 2 with the command's usage line


@dataclass
class CaseResult:
    name: str
    output: Path | None = None
    segments: list[dict] = field(default_factory=list)  # the run record's rows: name, voxels, volume_ml, ...
    normalization: str = ""  # what the model saw, in words
    seconds: float = 0.0
    error: str | None = None


def input_path(args) -> str:
    """The input, given as IMAGE or -i/--input (exactly one of them: otherwise a usage error)."""
    if args.image and args.input:
        args.usage_error("give the input once: IMAGE or -i/--input, not both")
    if not (args.image or args.input):
        args.usage_error("give an input image or folder: IMAGE or -i/--input")
    return args.image or args.input


def plan_outputs(args, inputs: str, extra_inputs=(), names: tuple[str, ...] = ()) -> tuple[list, dict, bool]:
    """(cases, {case name: OutputTarget}, whether this is a folder run), every output checked (format, suffix,
    folder, for DICOM SEG its source series) before any model runs; a file output before the input's cases are
    even looked for."""
    from ..cases import find_input_cases, is_folder_output, record_path
    from ..errors import InputError
    from ..files import refuse_input_as_output
    from ..outputs import output_suffix, plan_output

    out, source = Path(args.out), Path(inputs)
    def plan(path, image):
        return plan_output(path, args.output_format, image, args.series, args.overwrite, names=names)

    if not is_folder_output(out, collection=False):
        plan(out, source)
    cases = find_input_cases(source)
    collection = source.is_dir() and not (len(cases) == 1 and cases[0].path == source)
    into_folder = is_folder_output(out, collection)
    if into_folder and out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; the outputs of a folder of cases go into a folder")
    suffix = output_suffix(args.output_format)
    targets = {case.name: plan(out / f"{case.name}{suffix}" if into_folder else out, case.path) for case in cases}
    planned: dict = {}
    for case in cases:
        output = targets[case.name].path
        refuse_input_as_output(output, case.path, *extra_inputs, option="--out")
        record = record_path(output)
        refuse_input_as_output(record, case.path, *extra_inputs, option="run record")
        check_side_file(record, output, "run record", args.overwrite)
        files = [output, record]
        if args.preview is not None:
            preview = preview_path(args.preview, output, case.name, into_folder=collection)
            refuse_input_as_output(preview, case.path, *extra_inputs, option="--preview")
            if preview.resolve() in (output.resolve(), record.resolve()):
                raise InputError(f"--preview {preview.name} would overwrite the segmentation or its run record")
            if not preview.name.lower().endswith(".png"):
                raise InputError(f"--preview {preview.name}: a preview is a PNG picture; name a file ending in .png")
            check_side_file(preview, output, "preview", args.overwrite)
            files.append(preview)
        for path in files:
            other = planned.setdefault(path.resolve(), case.name)
            if other != case.name:
                raise InputError(f"cases {other} and {case.name} would both write {path.name}")
    return cases, targets, collection


def check_side_file(path: Path, output: Path, what: str, overwrite: bool) -> None:
    """A run record or preview may replace only what an earlier run wrote for this same output (its record names
    the output, and the preview); any other file there is the user's and is kept unless --overwrite."""
    from ..cases import record_path
    from ..errors import InputError
    from ..volume import check_writable_output

    check_writable_output(path)
    if not path.exists() or overwrite:
        return
    record = _read_record(record_path(output))
    ours = record is not None and record.get("output") == str(output.resolve())
    if ours and what == "preview":
        ours = record.get("preview") is not None and Path(record["preview"]).resolve() == path.resolve()
    if not ours:
        raise InputError(f"{what} {path} exists and was not written by segmote for {output.name}; it is left as it "
                         "is: choose another --out" + (" or --preview" if what == "preview" else "") +
                         ", or pass --overwrite to replace it")


def _read_record(path: Path) -> dict | None:
    """A SegMoTE run record at `path`, or None (missing, unreadable, or another tool's file)."""
    try:
        if path.stat().st_size > 1 << 22:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "segmote" else None


def run_cases(args, kind: str, cases, targets: dict, collection: bool,
              segment_case) -> tuple[int, list[CaseResult]]:
    """segment_case(engine, volume, case, show_slice_progress) -> (segments, details per segment, prompts record,
    the normalisation the model saw). Returns the exit status and each case's result (this process's cases and,
    under torchrun, the other ranks')."""
    from ..torchrun import torchrun_environment
    from ..volume import read_volume

    torchrun_environment()  # half-set torchrun variables: one line now, not after the first case
    shard = Shard.start(args) if collection else Shard()
    cases = cases[shard.rank::shard.world]
    engine = None
    results: list[CaseResult] = []
    with progress_bar("cases", args.quiet or not collection or shard.rank > 0, unit="case") as progress:
        for done, case in enumerate(cases):
            started = time.perf_counter()
            result = CaseResult(case.name, targets[case.name].path)
            try:
                volume = read_volume(case.path, args.series)
                if engine is None:
                    engine = engine_for_args(args)
                log.debug(f"{case.name}: {case.path}, {volume.describe_grid()}; {engine.model_name} on "
                          f"{engine.device} ({engine.runtime})")
                segments, details, prompts, normalization = segment_case(engine, volume, case,
                                                                         not (args.quiet or collection))
                log_notices(engine)
                write_case(args, kind, engine, volume, case, targets[case.name], result, segments, details, prompts,
                           normalization, started, collection)
            except Exception as error:  # noqa: BLE001 - a folder run reports the case and goes on
                if not collection:
                    raise
                result.error = _error_line(error)
                log.error(f"case {shown(case.name)}: {result.error}")
            result.seconds = time.perf_counter() - started
            results.append(result)
            written = [r for r in results if not r.error]
            if written:  # what an interruption (Ctrl+C) leaves behind, said as it is
                args.interrupted = (f"interrupted after {len(results)} of {len(cases)} cases; written: "
                                    + ", ".join(shown(str(r.output)) for r in written[:5])
                                    + (f" and {len(written) - 5} more" if len(written) > 5 else "")
                                    + "; the case in progress was not written")
            if progress:
                progress(done + 1, len(cases))
    results = shard.gather(results)
    if args.statistics and not args.quiet and shard.rank == 0:
        for result in results:
            if not result.error:
                print(statistics_table(result.name, result.segments))
    if collection and not args.quiet and shard.rank == 0:
        print(summary_table(results))
    return (1 if any(r.error for r in results) else 0), results


@dataclass
class Shard:
    """This process's share of a folder run: under torchrun (WORLD_SIZE > 1) rank r takes cases r, r + world, ...
    and the results meet on every rank, so rank 0 prints one summary and every rank exits 1 if any case failed
    anywhere. They meet through torchrun's key-value store, with no process group: a gloo group's threads could
    abort a rank at exit after its cases were written ("terminate called without an active exception")."""

    rank: int = 0
    world: int = 1
    store: object = None  # torch.distributed's store; None: one process, or a process group someone else started

    EXCHANGE_TIMEOUT_S = 24 * 3600  # how long a rank waits for the others' cases (ranks may finish hours apart)

    @classmethod
    def start(cls, args) -> "Shard":
        from ..torchrun import torchrun_environment

        _, world, local_rank = torchrun_environment()
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        if args.device == "auto" and torch.cuda.is_available():
            args.device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per process
        if dist.is_initialized():  # a program that started its own group: use it, and leave it to that program
            return cls(dist.get_rank(), dist.get_world_size())
        store, rank, world = next(dist.rendezvous("env://"))  # torch's connect timeout: a wrong address fails
        return cls(rank, world, store)

    def gather(self, results: list[CaseResult]) -> list[CaseResult]:
        if self.world == 1:
            return results
        if self.store is None:
            import torch.distributed as dist

            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, results)
        else:
            everyone = self._exchange(results)
        merged = [r for part in everyone for r in part]
        order = {name: n for n, name in enumerate(sorted(r.name for r in merged))}
        return sorted(merged, key=lambda r: order[r.name])

    def _exchange(self, results: list[CaseResult]) -> list:
        """Every rank's results, through the store. Without torchrun's agent rank 0 hosts the store, so it leaves
        only once every other rank has read all it needs."""
        keys = [f"segmote/cases/{rank}" for rank in range(self.world)]
        self.store.set(keys[self.rank], pickle.dumps(results))
        self.store.wait(keys, timedelta(seconds=self.EXCHANGE_TIMEOUT_S))
        everyone = [pickle.loads(self.store.get(key)) for key in keys]  # written by this run's own ranks
        read = self.store.add("segmote/read", 1)
        while self.rank == 0 and read < self.world:
            time.sleep(0.05)
            read = self.store.add("segmote/read", 0)
        return everyone


def shown(text: str) -> str:
    """A name as one line of a table or message: control characters (a newline in a file name) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _error_line(error: Exception) -> str:
    """A case's failure for the summary: a user's error as it is, anything else named as an internal error."""
    from ..errors import SegMoTEError
    from ..toolbox import one_line

    return one_line(error) if isinstance(error, SegMoTEError) else f"internal error ({one_line(error, named=True)})"


def write_case(args, kind, engine, volume, case, target, result: CaseResult, segments, details, prompts,
               normalization, started, collection: bool) -> None:
    import numpy as np

    from ..cases import record_path
    from ..outputs import save_output

    from ..files import StagedFile

    # The record and the preview are staged (their folder proven writable, the picture drawn) before the
    # segmentation is written, and put in place right after it: a failure leaves none of the three changed.
    staged: list[StagedFile] = []
    try:
        preview = None
        if args.preview is not None:
            from ..preview import save_overlay_png

            preview = preview_path(args.preview, result.output, case.name, into_folder=collection)
            staged.append(StagedFile(preview))
            save_overlay_png(staged[-1].temporary, volume, {s.name: s.mask for s in segments},
                             normalization,
                             title=f"{case.name}: {', '.join(s.name for s in segments)}")
        record_file = StagedFile(record_path(result.output))
        staged.append(record_file)
        stored = save_output(target, volume, segments, replace_same_name=args.overwrite, automatic=kind == "auto")
        if getattr(args, "terminology_notices", True):
            log_notices(target)
        target.notices.clear()
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        for segment, count, detail in zip(segments, stored, details):
            row = {"name": segment.name, "voxels": int(count), "volume_ml": round(count * voxel_ml, 3), **detail}
            if args.statistics:
                values = volume.array[segment.mask]
                row["mean_intensity"] = float(values.mean()) if values.size else None
                row["std_intensity"] = float(values.std()) if values.size else None
            result.segments.append(row)
        result.normalization = normalization.description
        record = run_record(args, kind, engine, volume, case, result, prompts, normalization,
                            time.perf_counter() - started, preview)
        text = json.dumps(json_safe(record), indent=1, allow_nan=False)
        record_file.write(lambda temporary: temporary.write_text(text, encoding="utf-8"))
        for part in staged:
            part.commit()
    finally:
        for part in staged:
            part.discard()


def json_safe(value):
    """A run record as standard JSON: NaN and infinities (a predicted IoU of an empty answer...) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def preview_path(given: str, output: Path, case_name: str, into_folder: bool) -> Path:
    from ..cases import record_path

    if not given:
        return record_path(output).with_suffix(".png")
    given = Path(given)
    return given / f"{case_name}.png" if into_folder or given.is_dir() else given


def run_record(args, kind, engine, volume, case, result: CaseResult, prompts, normalization, seconds: float,
               preview) -> dict:
    from .. import __version__
    from ..torchrun import torchrun_environment
    from ..files import sha256_file
    from ..shipped import resolve_adapter

    adapter = None
    if engine.adapter_header is not None and getattr(args, "adapter", None):
        adapter_file = resolve_adapter(args.adapter)
        adapter = {"path": str(adapter_file.resolve()), "sha256": sha256_file(adapter_file),
                   "classes": [c.get("name") for c in engine.adapter_header.get("classes", [])]}
    return {
        "tool": "segmote", "version": __version__, "command": kind,
        "input": str(Path(case.path).resolve()), "case": case.name, "output": str(Path(result.output).resolve()),
        "grid": volume.describe_grid(),
        "model": {"name": engine.model_name, "weights_sha256": getattr(engine.backbone, "weights_sha256", None),
                  "precision": args.precision, "compiled": bool(engine.compiled)},
        "adapter": adapter,
        "normalization": normalization.description,
        "prompts": prompts,
        "device": str(engine.device), "runtime": engine.runtime,
        # the exported graphs that ran (ONNX Runtime / OpenVINO), each checked against the weights named above
        "runtime_models": engine.runtime_models or None,
        "segments": result.segments,
        "preview": str(preview) if preview else None,
        "wall_time_s": round(seconds, 3),
        "process": dict(zip(("rank", "world_size"), torchrun_environment())),
    }


def summary_table(results: list[CaseResult]) -> str:
    rows = [("case", "status", "segments", "ml", "s", "output")]
    for r in results:
        rows.append((shown(r.name), "failed" if r.error else "ok", str(len(r.segments)),
                     f"{sum(s['volume_ml'] for s in r.segments):.1f}" if not r.error else "-", f"{r.seconds:.1f}",
                     shown(str(r.output)) if not r.error else shown(r.error[:60])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    failed = sum(1 for r in results if r.error)
    lines.append(f"{len(results) - failed} of {len(results)} cases done" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


def statistics_table(case_name: str, segments: list[dict]) -> str:
    rows = [("segment", "voxels", "ml", "mean", "std")]
    for s in segments:
        mean = "-" if s.get("mean_intensity") is None else f"{s['mean_intensity']:.1f}"
        std = "-" if s.get("std_intensity") is None else f"{s['std_intensity']:.1f}"
        rows.append((s["name"], str(s["voxels"]), f"{s['volume_ml']:.2f}", mean, std))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [f"{shown(case_name)}:"] + ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                                  enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)
