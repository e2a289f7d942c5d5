"""`segmote weights {download,list,path}`: the backbone checkpoints in the local cache."""

from __future__ import annotations

from .common import add_verbosity_options

HELP = "download and locate backbone checkpoints"


def add_parser(commands) -> None:
    from ..weights import KNOWN_WEIGHTS  # a table of names and digests: no network or torch

    known = ", ".join(KNOWN_WEIGHTS)
    parser = commands.add_parser("weights", help=HELP,
                                 description="Download and locate the Segment Anything backbone checkpoints.")
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)

    download = actions.add_parser("download", help="download a checkpoint into the cache (resumable)",
                                  description="Download a checkpoint into the cache; an interrupted download "
                                              "resumes where it stopped. The file must match its pinned SHA-256.")
    # No argparse `choices`: an unknown name gets the library's one-line error listing the known names.
    download.add_argument("name", metavar="NAME", help=f"one of: {known}")
    download.add_argument("--url", help="mirror to download from; the file must still match the pinned SHA-256")
    add_verbosity_options(download)

    listing = actions.add_parser("list", help="list known checkpoints and where each one is")
    add_verbosity_options(listing)

    path = actions.add_parser("path", help="print the cached checkpoint's path")
    path.add_argument("name", metavar="NAME", help=f"one of: {known}")
    add_verbosity_options(path)

    parser.set_defaults(func=run, interrupted="interrupted; run the same command again to resume the download")


def run(args) -> int:
    from ..errors import InputError
    from ..weights import cached_weights, download_weights

    if args.weights_action == "download":
        print(download_weights(args.name, url=args.url, progress=not args.quiet))
        return 0
    if args.weights_action == "list":
        print_list()
        return 0
    found = cached_weights(args.name)
    if found is None:
        raise InputError(f"{args.name} is not downloaded; run: segmote weights download {args.name}")
    print(found)
    return 0


def print_list() -> None:
    from ..weights import KNOWN_WEIGHTS, cached_weights, weights_folder

    print(f"downloads go to {weights_folder()} (set SEGMOTE_CACHE_DIR to move them)")
    rows = []
    for name, info in KNOWN_WEIGHTS.items():  # table order: smallest backbone first
        cached = cached_weights(name)
        missing = f"not installed (it ships in the {info.shipped_in} package)" if info.shipped_in else "not downloaded"
        rows.append((name, human_size(info.size_bytes), str(cached) if cached else missing))
    name_width = max(len(row[0]) for row in rows)
    size_width = max(len(row[1]) for row in rows)
    for name, size, where in rows:
        print(f"{name:<{name_width}}  {size:>{size_width}}  {where}")


def human_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "unknown"
    if size_bytes >= 1 << 30:
        return f"{size_bytes / (1 << 30):.2f} GiB"
    if size_bytes >= 1 << 20:
        return f"{size_bytes / (1 << 20):.0f} MiB"
    return f"{size_bytes} B"
