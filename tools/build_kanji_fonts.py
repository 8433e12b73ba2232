"""Build Kanji-Fonts-32, the image data set shipped inside ``deepmetric.data``.

Each class is one JIS X 0208 level-1 kanji (rows 16-47, 2,965 characters); each sample is
that character drawn by one type face, rendered with Pillow (whose wheel bundles FreeType),
cropped to ink, scaled with one factor per face, centred in 32x32 and binarised.

Steps (all inputs sorted, so two runs give the same bytes):

1. ``apt-get download`` the Debian font packages into ``<build>/debs`` (run ``apt-get update``
   once before) and unpack each with ``dpkg-deb -x`` into ``<build>/root/<package>``;
   nothing is installed system-wide.
2. Read each package's ``usr/share/doc/<package>/copyright`` (machine-readable DEP-5 format)
   and decide each font file's licence: kept only if it allows redistributing renderings
   without copyleft (OFL, IPA, Apache, BSD, MIT, CC-BY, M+, public domain). GPL, LGPL,
   CC-BY-SA and unknown licence names are excluded (an ``or`` picks an allowed alternative).
3. Every face of every font file (a ``.ttc`` collection holds several) is a candidate; each
   is rendered for all 2,965 characters (a character counts as covered when its glyph has
   ink and differs from the face's ``.notdef`` glyph).
4. Faces covering fewer than ``--min-coverage`` of the characters are dropped; then, in
   sorted order, a face is dropped as a near duplicate when more than ``--dup-share`` of a
   fixed sample of characters (every ``--dup-every``-th) have a pixel IoU of at least
   ``--dup-iou`` with an already kept face.
5. The classes are the characters every kept face covers. Images are written class-major
   (sample ``i`` is class ``i // num_faces``, face ``i % num_faces``) as ``np.packbits`` rows,
   a ``.npy`` stream compressed with xz, beside a JSON file with the characters and faces and
   a FONTS-ATTRIBUTION file with each face's copyright and licence.

Usage, from the repository root (16 minutes measured on 2 cores shared with other jobs:
rendering took 2.5 to 6.5 minutes, the raw-pixel evaluation that ``--skip-eval`` leaves
out 9 to 15)::

    apt-get update
    .venv/bin/python tools/build_kanji_fonts.py            # fetch, render, filter, pack
    .venv/bin/python tools/build_kanji_fonts.py --no-fetch # reuse build/fonts/debs

The build log (one line per face with its licence decision and the reason it was kept or
dropped) is written to ``build/fonts/build_log.txt`` and a summary to ``build/fonts/report.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PACKAGES: tuple[str, ...] = tuple(
    sorted(
        """
    fonts-noto-cjk fonts-noto-cjk-extra fonts-ipaexfont-gothic fonts-ipaexfont-mincho
    fonts-ipafont-gothic fonts-ipafont-mincho fonts-takao-gothic fonts-takao-mincho
    fonts-vlgothic fonts-hanazono fonts-seto fonts-kiloji fonts-klee fonts-aoyagi-kouzan-t
    fonts-aoyagi-soseki fonts-kouzan-mouhitsu fonts-lxgw-wenkai fonts-sawarabi-gothic
    fonts-sawarabi-mincho fonts-morisawa-bizud-gothic fonts-morisawa-bizud-mincho
    fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-mplus fonts-umeplus fonts-droid-fallback
    fonts-smiley-sans fonts-dejima-mincho fonts-konatu fonts-yusei-magic
    """.split()
    )
)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
IMAGE_SIZE = 32
RENDER_SIZE = 128  # font size in pixels of the large rendering that is cropped and shrunk
BOX_PERCENTILE = 98.0  # this percentile of a face's glyph sizes is scaled to TARGET_BOX
TARGET_BOX = 28  # pixels
MAX_BOX = 30  # no glyph is larger than this after scaling
INK_THRESHOLD = 0.3  # a 32x32 pixel is ink when at least this share of its area is covered
DATA_STEM = "kanji_fonts_32"

# DEP-5 licence short names (lower case) that allow shipping renderings without copyleft,
# mapped to the name written in the attribution file.
ALLOWED_LICENCES = {
    "public-domain": "Public domain",
    "mit": "MIT",
    "bsd-3-clause": "BSD-3-Clause",
    "apache-2": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "ofl-1.1": "OFL-1.1",
    "sil-1.1": "OFL-1.1",
    "open-font-license": "OFL-1.1",
    "ipa-1": "IPA-1.0",
    "cc-by-3.0": "CC-BY-3.0",
    "cc-by-4.0": "CC-BY-4.0",
    "cc0-1.0": "CC0-1.0",
    "m+fonts": "M+ FONTS License",
    "m+font": "M+ FONTS License",
    "hanazono-font-license": "Hanazono Font License",
    "sazanamifont": "Sazanami Font License (permissive)",
}
COPYLEFT_PREFIXES = ("gpl", "lgpl", "agpl", "cc-by-sa", "mpl", "epl", "gfdl")


def jis_level1_kanji() -> list[str]:
    """The JIS X 0208 level-1 kanji: rows 16-47 of the EUC-JP table, in JIS order."""
    chars = []
    for row in range(16, 48):
        for cell in range(1, 95):
            try:
                chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp"))
            except UnicodeDecodeError:
                continue
    return chars


# --------------------------------------------------------------------------- fetch, unpack


def fetch_and_unpack(build_dir: Path, fetch: bool) -> list[str]:
    """Download (unless ``fetch`` is false) and unpack every package; return the log lines."""
    debs, root = build_dir / "debs", build_dir / "root"
    debs.mkdir(parents=True, exist_ok=True)
    log = []
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing and fetch:
        cmd = ["apt-get", "download", *missing]
        result = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(
                f"apt-get download failed ({result.stderr.strip()}); run `apt-get update` "
                f"first, or put the .deb files in {debs} and pass --no-fetch"
            )
    for package in PACKAGES:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            sys.exit(f"no .deb for {package} in {debs}: run without --no-fetch")
        target = root / package
        if not target.exists():  # unpack beside it, then rename: no half-unpacked folders
            partial = root / f"{package}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(partial)], check=True)
            partial.rename(target)
        log.append(f"package {package}: {found[-1].name}")
    return log


# --------------------------------------------------------------------------- licences


@dataclass
class Licence:
    """The licence decision for one font file, read from its package's copyright file."""

    allowed: bool
    expression: str  # the DEP-5 ``License:`` expression as written
    chosen: tuple[str, ...]  # the licences that apply (one alternative of an ``or``)
    reason: str
    copyright: str
    texts: dict[str, str] = field(default_factory=dict)  # chosen licence -> full text


def parse_dep5(text: str) -> list[dict[str, str]]:
    """Split a DEP-5 copyright file into paragraphs of ``field -> value`` (continuations kept)."""
    paragraphs, current, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key is not None:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def _licence_text(body: str) -> str:
    lines = body.split("\n")[1:]
    return "\n".join("" if line == "." else line for line in lines).strip()


def decide_licence(copyright_file: Path, font_file: Path) -> Licence:
    """Decide whether renderings of ``font_file`` may be shipped, from the DEP-5 file."""
    if not copyright_file.exists():
        return Licence(False, "", (), "no copyright file: unclear", "")
    paragraphs = parse_dep5(copyright_file.read_text(encoding="utf-8", errors="replace"))
    if not paragraphs or "format" not in paragraphs[0]:
        return Licence(False, "", (), "copyright file not machine-readable: unclear", "")
    standalone = {
        p["license"].split("\n", 1)[0].strip().lower(): _licence_text(p["license"])
        for p in paragraphs
        if "license" in p and "files" not in p
    }
    match = None
    for p in paragraphs:
        if "files" not in p:
            continue
        patterns = [x for x in p["files"].split() if not x.startswith("debian/")]
        if any(fnmatch.fnmatch(font_file.name, Path(x).name) for x in patterns):
            match = p  # DEP-5: the last matching paragraph wins
    if match is None or "license" not in match:
        return Licence(False, "", (), "no Files paragraph matches: unclear", "")
    expression = match["license"].split("\n", 1)[0].strip()
    inline = _licence_text(match["license"])
    holders = match.get("copyright", "").strip()
    rejected = []
    for alternative in re.split(r"\s+or\s+", expression, flags=re.IGNORECASE):
        names = [n.strip() for n in re.split(r"\s+and\s+", alternative, flags=re.IGNORECASE)]
        keys = [n.lower() for n in names]
        bad = [n for n, k in zip(names, keys, strict=True) if k not in ALLOWED_LICENCES]
        if not bad:
            chosen = tuple(ALLOWED_LICENCES[k] for k in keys)
            texts = {}
            for name, key in zip(chosen, keys, strict=True):
                text = standalone.get(key) or (inline if len(keys) == 1 else "")
                texts[name] = text
            reason = f"allowed: {' and '.join(chosen)}"
            return Licence(True, expression, chosen, reason, holders, texts)
        rejected.extend(bad)
    copyleft = [n for n in rejected if n.lower().startswith(COPYLEFT_PREFIXES)]
    kind = "copyleft" if copyleft else "not on the allowed list (unclear)"
    return Licence(False, expression, (), f"excluded: {', '.join(rejected)} is {kind}", holders)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Candidate:
    """One face of one font file: a candidate sample source."""

    package: str
    path: Path
    index: int

    @property
    def file(self) -> str:
        """The font file name with the face index of a collection."""
        return self.path.name + (f"#{self.index}" if self.path.suffix in (".ttc", ".otc") else "")


def count_faces(path: Path) -> int:
    """Number of faces in a font file (a TrueType/OpenType collection holds several)."""
    with path.open("rb") as handle:
        head = handle.read(12)
    if head[:4] == b"ttcf":
        return struct.unpack(">I", head[8:12])[0]
    return 1


def find_candidates(build_dir: Path) -> list[Candidate]:
    """Every face of every font file in the unpacked packages, sorted."""
    out = []
    for package in PACKAGES:
        files = sorted(
            p
            for p in (build_dir / "root" / package).rglob("*")
            if p.suffix.lower() in FONT_SUFFIXES and p.is_file() and not p.is_symlink()
        )
        for path in files:
            out.extend(Candidate(package, path, i) for i in range(count_faces(path)))
    return out


def _ink_crop(font: ImageFont.FreeTypeFont, char: str) -> tuple[np.ndarray, bool]:
    """Render ``char`` large and crop it to its ink; also report whether it touched the edge."""
    side = 2 * RENDER_SIZE
    image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(image).text((side / 2, side / 2), char, font=font, fill=255, anchor="mm")
    pixels = np.asarray(image)
    rows = np.flatnonzero(pixels.max(axis=1))
    cols = np.flatnonzero(pixels.max(axis=0))
    if rows.size == 0:
        return np.zeros((0, 0), np.uint8), False
    clipped = rows[0] == 0 or cols[0] == 0 or rows[-1] == side - 1 or cols[-1] == side - 1
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], bool(clipped)


def _place(crop: np.ndarray, scale: float) -> np.ndarray:
    """Shrink a crop by ``scale`` (area average), binarise and centre it in the output square."""
    h, w = crop.shape
    scale = min(scale, MAX_BOX / max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.BOX))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    top, left = (IMAGE_SIZE - nh) // 2, (IMAGE_SIZE - nw) // 2
    out[top : top + nh, left : left + nw] = small >= INK_THRESHOLD * 255
    return out


def render_face(job: tuple[str, int, list[str], str]) -> dict:
    """Render one face for all characters; cached in ``cache_file`` (a worker function)."""
    path, index, chars, cache_file = job
    cache = Path(cache_file)
    if cache.exists():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    font = ImageFont.truetype(path, RENDER_SIZE, index=index, layout_engine=ImageFont.Layout.BASIC)
    family, style = font.getname()
    notdef, _ = _ink_crop(font, "\U0010fffd")  # a private-use code point no face maps
    crops, covered, clipped = [], np.zeros(len(chars), bool), 0
    for i, char in enumerate(chars):
        crop, edge = _ink_crop(font, char)
        same_as_notdef = crop.shape == notdef.shape and np.array_equal(crop, notdef)
        covered[i] = crop.size > 0 and not same_as_notdef
        clipped += int(edge and covered[i])
        crops.append(crop)
    images = np.zeros((len(chars), IMAGE_SIZE, IMAGE_SIZE), bool)
    if covered.any():
        sizes = [max(c.shape) for c, ok in zip(crops, covered, strict=True) if ok]
        scale = TARGET_BOX / float(np.percentile(sizes, BOX_PERCENTILE))
        for i in np.flatnonzero(covered):
            images[i] = _place(crops[i], scale)
            covered[i] = images[i].any()
    result = {
        "name": np.array(f"{family} {style}".strip()),
        "covered": covered,
        "bits": np.packbits(images.reshape(len(chars), -1), axis=1),
        "clipped": np.array(clipped),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(cache)
    return result


def cache_path(build_dir: Path, candidate: Candidate) -> Path:
    """Cache file of a candidate's renderings, keyed by the file, face and render settings."""
    settings = (
        candidate.path.stat().st_size,
        candidate.index,
        IMAGE_SIZE,
        RENDER_SIZE,
        BOX_PERCENTILE,
        TARGET_BOX,
        MAX_BOX,
        INK_THRESHOLD,
    )
    key = hashlib.sha1(f"{candidate.path}|{settings}".encode()).hexdigest()[:16]
    return build_dir / "cache" / f"{candidate.path.stem}-{candidate.index}-{key}.npz"


# --------------------------------------------------------------------------- selection


def iou_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row pixel IoU of two packed-bit arrays of the same shape."""
    inter = np.bitwise_count(a & b).sum(axis=1)
    union = np.bitwise_count(a | b).sum(axis=1)
    return inter / np.maximum(union, 1)


def raw_pixel_retrieval(bits: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> dict:
    """R@1 and MAP@R of exact Hamming nearest neighbours on raw pixels (self excluded).

    Ties in distance are broken by sample index, so the figures are deterministic.
    """
    import torch

    x = torch.from_numpy(np.unpackbits(bits, axis=1).astype(np.float32))
    y = torch.from_numpy(labels)
    n = len(x)
    norms = x.sum(dim=1)
    counts = torch.bincount(y)
    r = int(counts[y].max()) - 1
    tie_break = torch.arange(n, dtype=torch.float64) / (4.0 * n)  # < 1/4 of a pixel
    hits1, ap_sum = 0.0, 0.0
    for start in range(0, n, chunk):
        q, qy = x[start : start + chunk], y[start : start + chunk]
        d = (norms[start : start + chunk, None] + norms[None, :] - 2 * q @ x.T).double()
        d += tie_break
        rows = torch.arange(len(q))
        d[rows, rows + start] = float("inf")
        order = torch.topk(d, r, dim=1, largest=False, sorted=True).indices
        same = (y[order] == qy[:, None]).double()
        hits1 += float(same[:, 0].sum())
        rq = (counts[qy] - 1).clamp(min=1).double()  # a singleton class scores 0
        precision = same.cumsum(dim=1) / torch.arange(1, r + 1)
        mask = torch.arange(r)[None, :] < rq[:, None]
        ap_sum += float(((precision * same * mask).sum(dim=1) / rq).sum())
    return {"recall_at_1": round(hits1 / n, 4), "map_at_r": round(ap_sum / n, 4)}


def build(args: argparse.Namespace) -> None:
    """Run every step and write the artefacts; see the module docstring."""
    start = time.time()
    build_dir, out_dir = Path(args.build_dir), Path(args.out_dir)
    log = fetch_and_unpack(build_dir, fetch=not args.no_fetch)
    chars = jis_level1_kanji()
    candidates = find_candidates(build_dir)
    log.append(f"{len(chars)} characters, {len(candidates)} candidate faces")

    licences = {}
    for c in candidates:
        if c.path not in licences:
            doc = build_dir / "root" / c.package / "usr/share/doc" / c.package / "copyright"
            licences[c.path] = decide_licence(doc, c.path)
    licensed = [c for c in candidates if licences[c.path].allowed]
    jobs = [(str(c.path), c.index, chars, str(cache_path(build_dir, c))) for c in licensed]
    with Pool(args.jobs) as pool:
        renders = pool.map(render_face, jobs, chunksize=1)
    rendered = dict(zip(licensed, renders, strict=True))
    log.append(f"rendered {len(licensed)} faces in {time.time() - start:.0f} s")

    sample = np.arange(0, len(chars), args.dup_every)
    kept: list[Candidate] = []
    decisions = []
    for c in candidates:
        lic = licences[c.path]
        entry = {"package": c.package, "file": c.file, "licence": lic.expression}
        decisions.append(entry)
        if not lic.allowed:
            entry.update(name=c.file, kept=False, reason=lic.reason)
            continue
        r = rendered[c]
        entry["name"] = str(r["name"])
        coverage = float(r["covered"].mean())
        entry["coverage"] = round(coverage, 4)
        if coverage < args.min_coverage:
            entry.update(kept=False, reason=f"covers {coverage:.1%} < {args.min_coverage:.0%}")
            continue
        worst = (0.0, None)
        for k in kept:
            both = sample[r["covered"][sample] & rendered[k]["covered"][sample]]
            iou = iou_rows(r["bits"][both], rendered[k]["bits"][both])
            share = float((iou >= args.dup_iou).mean()) if both.size else 0.0
            worst = max(worst, (share, k), key=lambda t: t[0])
        if worst[0] > args.dup_share:
            other = str(rendered[worst[1]]["name"])
            entry.update(kept=False, reason=f"near duplicate of {other} ({worst[0]:.0%} alike)")
            continue
        entry.update(kept=True, reason=f"{lic.reason}; most alike kept face {worst[0]:.0%}")
        kept.append(c)

    covered = np.stack([rendered[k]["covered"] for k in kept]).all(axis=0)
    classes = [ch for ch, ok in zip(chars, covered, strict=True) if ok]
    bits = np.stack([rendered[k]["bits"][covered] for k in kept], axis=1)  # (C, F, 128)
    num_classes, num_faces = bits.shape[:2]
    bits = np.ascontiguousarray(bits.reshape(num_classes * num_faces, -1))

    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{DATA_STEM}.npy.xz"
    partial = data_file.with_name(data_file.name + ".partial")  # then rename: never half-written
    with lzma.open(partial, "wb", preset=9 | lzma.PRESET_EXTREME) as handle:
        np.save(handle, bits, allow_pickle=False)
    partial.replace(data_file)
    faces = []
    for k in kept:
        lic = licences[k.path]
        faces.append(
            {
                "name": str(rendered[k]["name"]),
                "package": k.package,
                "file": k.file,
                "licence": " and ".join(lic.chosen),
            }
        )
    meta = {
        "name": "Kanji-Fonts-32",
        "image_size": IMAGE_SIZE,
        "layout": "class-major: sample i is class i // num_faces drawn by face i % num_faces",
        "num_classes": num_classes,
        "num_faces": num_faces,
        "train_classes": (num_classes + 1) // 2,
        "characters": "".join(classes),
        "faces": faces,
        "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        "built_by": "tools/build_kanji_fonts.py",
        "settings": {
            "render_size": RENDER_SIZE,
            "box_percentile": BOX_PERCENTILE,
            "target_box": TARGET_BOX,
            "max_box": MAX_BOX,
            "ink_threshold": INK_THRESHOLD,
            "min_coverage": args.min_coverage,
            "dup_iou": args.dup_iou,
            "dup_share": args.dup_share,
            "dup_every": args.dup_every,
        },
    }
    (out_dir / f"{DATA_STEM}.json").write_text(
        json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    attribution = out_dir / "FONTS-ATTRIBUTION.txt"
    write_attribution(attribution, kept, rendered, licences, build_dir, decisions)

    labels = np.repeat(np.arange(num_classes), num_faces)
    test = labels >= (num_classes + 1) // 2
    figures = {}
    if not args.skip_eval:
        eval_start = time.time()
        figures = raw_pixel_retrieval(bits[test], labels[test])
        log.append(f"raw-pixel retrieval on the test split took {time.time() - eval_start:.0f} s")
    clipped = {str(rendered[k]["name"]): int(rendered[k]["clipped"]) for k in kept}
    report = {
        "characters": len(chars),
        "candidates": len(candidates),
        "licensed": len(licensed),
        "kept_faces": num_faces,
        "classes": num_classes,
        "images": int(bits.shape[0]),
        "packed_bytes": data_file.stat().st_size,
        "raw_pixel_test": figures,
        "clipped_glyphs": {k: v for k, v in clipped.items() if v},
        "settings": {
            k: getattr(args, k) for k in ("min_coverage", "dup_iou", "dup_share", "dup_every")
        },
        "seconds": round(time.time() - start),
        "faces": decisions,
    }
    (build_dir / "report.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    for d in decisions:
        verdict = "KEEP" if d["kept"] else "drop"
        log.append(f"{verdict} {d['package']:30} {d['file']:34} {d['name']}: {d['reason']}")
    log.append(
        f"{num_faces} faces x {num_classes} classes = {bits.shape[0]} images, "
        f"{data_file.stat().st_size / 1e6:.2f} MB packed; raw-pixel test split {figures}"
    )
    (build_dir / "build_log.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    print("\n".join(log))


def write_attribution(
    path: Path,
    kept: Sequence[Candidate],
    rendered: dict,
    licences: dict,
    build_dir: Path,
    decisions: Sequence[dict],
) -> None:
    """Write each kept face with its package, copyright holders and licence, the licence
    decision and reason for every face not used, then the licence texts."""
    lines = [
        "Kanji-Fonts-32: fonts whose renderings make up this data set",
        "=" * 62,
        "",
        "Every image in kanji_fonts_32.npy.xz is a 32x32 binarised rendering of one character",
        "in one of the type faces below, made with Pillow/FreeType by tools/build_kanji_fonts.py.",
        "No font software is distributed. Each face was taken from the Debian (bookworm) package",
        "named, and its licence read from that package's usr/share/doc/<package>/copyright.",
        "Only faces whose licence allows redistribution of renderings without copyleft were used.",
        "",
    ]
    texts: dict[str, tuple[str, list[str]]] = {}  # text -> (licence name, packages)
    for number, k in enumerate(kept, start=1):
        lic = licences[k.path]
        deb = sorted((build_dir / "debs").glob(f"{k.package}_*.deb"))[-1].name
        lines += [
            f"{number:2d}. {rendered[k]['name']}",
            f"    file:      {k.file}",
            f"    package:   {deb}",
            f"    copyright: {lic.copyright.replace(chr(10), chr(10) + ' ' * 15)}",
            f"    licence:   {' and '.join(lic.chosen)} (Debian: License: {lic.expression})",
            "",
        ]
        for name, text in lic.texts.items():
            if text:
                packages = texts.setdefault(text, (name, []))[1]
                if k.package not in packages:
                    packages.append(k.package)
    dropped = [d for d in decisions if not d["kept"]]
    lines += [
        "",
        f"Faces considered and not used ({len(dropped)}): Debian licence; reason",
        "=" * 62,
        "",
    ]
    for d in dropped:
        lines.append(f"- {d['name']} ({d['package']}, {d['file']}): {d['licence']}; {d['reason']}")
    lines += ["", "", "Licence texts (as given in the Debian copyright files)", "=" * 54, ""]
    for text, (name, packages) in sorted(texts.items(), key=lambda t: (t[1][0], t[1][1])):
        lines += [f"--- {name}, as given for {', '.join(packages)}", "", text, ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and build the data set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default="build/fonts", help="downloads, unpacked fonts")
    parser.add_argument("--out-dir", default="src/deepmetric/data", help="shipped artefacts")
    parser.add_argument("--no-fetch", action="store_true", help="use the .deb files present")
    parser.add_argument("--jobs", type=int, default=2, help="rendering processes")
    parser.add_argument("--min-coverage", type=float, default=0.95)
    parser.add_argument("--dup-iou", type=float, default=0.8, help="IoU of 'alike' glyphs")
    parser.add_argument("--dup-share", type=float, default=0.5, help="share of alike glyphs")
    parser.add_argument("--dup-every", type=int, default=4, help="compare every n-th character")
    parser.add_argument("--skip-eval", action="store_true", help="skip the raw-pixel R@1")
    build(parser.parse_args(argv))


if __name__ == "__main__":
    main()
