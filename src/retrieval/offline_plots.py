"""The HTML template of `dvc plots show` / `dvc plots diff` that works offline.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so without the network every
chart is blank. `.dvc/config` points DVC at `.dvc/plots/offline.html` (``plots.html_template``),
which carries the three libraries' minified builds inline: the page DVC writes is one file that
renders anywhere. The template is committed (a fresh clone needs nothing else); this module
rebuilds it from the npm registry's packages, pinned below:

    make plots-template      # = python -m retrieval.offline_plots (needs npm)

To update, change the versions in ``SCRIPTS``, run that, check `dvc plots show` in a browser
(tests/test_offline_plots.py does it in headless Chromium) and commit the template. Vega 6,
Vega-Lite 6 and vega-embed 7 ship ES modules only; DVC's page calls ``vegaEmbed`` from classic
scripts, so the 5 / 5 / 6 lines (UMD builds, and the Vega-Lite v5 schema DVC's templates name)
are the ones that fit.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retrieval.outputs import UserError, run_main

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
LICENSE = REPO / ".dvc" / "plots" / "offline-LICENSE.txt"


@dataclass(frozen=True)
class Script:
    package: str
    version: str
    path: str  # inside the npm tarball's package/ folder
    bundles: str  # what else the minified build contains, for the licence notice


SCRIPTS = (
    Script("vega", "5.33.1", "build/vega.min.js",
           "the vega-* modules (BSD-3-Clause) and d3 modules (ISC)"),
    Script("vega-lite", "5.23.0", "build/vega-lite.min.js",
           "json-stringify-pretty-compact (MIT), tslib (0BSD)"),
    Script("vega-embed", "6.29.0", "build/vega-embed.min.js",
           "vega-themes, vega-tooltip, vega-schema-url-parser (BSD-3-Clause), fast-json-patch "
           "(MIT), semver (ISC), json-stringify-pretty-compact (MIT)"),
)

# DVC fills these by plain text replacement over the whole template, scripts included.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots</title>
<!--
  The DVC plots page, offline: {versions} are inlined below,
  and this template leaves out DVC's scripts placeholder, so DVC adds no CDN script.
  Built by `make plots-template` (src/retrieval/offline_plots.py) from the npm packages:
{sources}
  Licences: .dvc/plots/offline-LICENSE.txt (BSD-3-Clause; bundled modules listed there).
-->
{scripts}
<style>
  body {{ font-family: sans-serif; }}
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""

BSD_3 = """Copyright (c) 2015, University of Washington Interactive Data Lab
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its contributors
   may be used to endorse or promote products derived from this software
   without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def inline_script(name: str, source: str) -> str:
    """``source`` as an inline classic script. Refused if it could end the element early or
    hold one of DVC's placeholders (DVC would replace it inside the code)."""
    if re.search(r"</script", source, re.IGNORECASE):
        raise UserError(f"{name} contains '</script': it cannot be inlined as it is")
    for placeholder in PLACEHOLDERS:
        if placeholder in source:
            raise UserError(f"{name} contains DVC's placeholder {placeholder}: DVC would "
                            "replace it inside the script")
    # The source map it names is not shipped: the line would only send a browser's
    # developer tools looking for it.
    source = re.sub(r"^//# sourceMappingURL=.*$", "", source, flags=re.MULTILINE)
    return f"<script>/* {name} */\n{source.strip()}\n</script>"


def build_template(sources: dict[Script, str]) -> str:
    """The DVC HTML template with each script's minified source inline, in SCRIPTS order
    (vega-lite and vega-embed find ``vega`` as a global)."""
    missing = [s.package for s in SCRIPTS if s not in sources]
    if missing:
        raise UserError(f"missing scripts: {', '.join(missing)}")
    scripts = "\n".join(inline_script(f"{s.package}@{s.version} {s.path}", sources[s])
                        for s in SCRIPTS)
    listing = "\n".join(
        f"    {s.package}@{s.version} {s.path} "
        f"sha256 {hashlib.sha256(sources[s].encode()).hexdigest()}" for s in SCRIPTS)
    versions = ", ".join(f"{s.package} {s.version}" for s in SCRIPTS)
    page = PAGE.format(versions=versions, sources=listing, scripts="{SCRIPTS}")
    # The scripts go in last: str.format would read their braces as fields.
    return page.replace("{SCRIPTS}", scripts)


def license_notice() -> str:
    lines = ["The DVC plots template .dvc/plots/offline.html inlines these npm packages' "
             "minified builds,", "each under the BSD-3-Clause licence below:", ""]
    for s in SCRIPTS:
        lines.append(f"- {s.package}@{s.version} ({s.path}); it also bundles {s.bundles}.")
    lines += ["", "vega, vega-lite and vega-embed:", "", BSD_3]
    return "\n".join(lines)


def npm_sources(folder: Path) -> dict[Script, str]:
    """Fetch the pinned packages with `npm pack` (the registry's tarballs, checked against
    their integrity hashes by npm) and read each build out of them."""
    specs = [f"{s.package}@{s.version}" for s in SCRIPTS]
    try:
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=folder, check=True,
                       capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise UserError("npm is not installed: `apt-get install npm`, then rerun "
                        "`make plots-template`") from None
    except subprocess.CalledProcessError as failed:
        raise UserError(f"npm pack {' '.join(specs)} failed: "
                        f"{failed.stderr.strip().splitlines()[-1:]}") from None
    sources = {}
    for s in SCRIPTS:
        with tarfile.open(folder / f"{s.package}-{s.version}.tgz") as archive:
            member = archive.extractfile(f"package/{s.path}")
            if member is None:
                raise UserError(f"{s.package}@{s.version} has no {s.path}")
            sources[s] = member.read().decode("utf-8")
    return sources


def write(template: Path = TEMPLATE, notice: Path = LICENSE) -> None:
    with tempfile.TemporaryDirectory() as folder:
        sources = npm_sources(Path(folder))
    template.write_text(build_template(sources), encoding="utf-8")
    notice.write_text(license_notice(), encoding="utf-8")
    print(f"wrote {template} ({template.stat().st_size / 1e3:.0f} kB) and {notice}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE, help="the template to write")
    args = parser.parse_args(argv)
    write(args.out, args.out.with_name(LICENSE.name))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
