"""Our code vs the authors' own code on tiny inputs (out of the test suite: it needs the authors' code).

The authors' files are loaded at run time from `--references DIR` (nothing of theirs is in this repository):
functions are extracted with `ast` and exec'd with stubs for heavy or CUDA-only imports, then run side by side
with ours on the same tiny inputs. Each check prints one line (what, metric, PASS/FAIL against its tolerance);
all results go to benchmarks/results/reference_parity.json. Exit status: 0 all pass, 1 a check failed,
2 a reference file is missing.

Layout of DIR (one clone per repository, checked out at the stated commit):

    DIR/OPTML-Group+Unlearn-Saliency        github.com/OPTML-Group/Unlearn-Saliency        a6e89fd
    DIR/OPTML-Group+Unlearn-Sparse          github.com/OPTML-Group/Unlearn-Sparse          80ba55d
    DIR/ShaofeiShen768+LAF                  github.com/ShaofeiShen768/LAF                  bda3694
    DIR/atriguha+Adapt_Unlearn              github.com/atriguha/Adapt_Unlearn              163a354
    DIR/lileyang1210+ANT                    github.com/lileyang1210/ANT                    78ce8f3
    DIR/rohitgandikota+unified-concept-editing  github.com/rohitgandikota/unified-concept-editing  28c81ed
    DIR/yongliang-wu+DoCo                   github.com/yongliang-wu/DoCo                   ebf6ff4

e.g. `git clone https://github.com/OPTML-Group/Unlearn-Saliency DIR/OPTML-Group+Unlearn-Saliency &&
git -C DIR/OPTML-Group+Unlearn-Saliency checkout a6e89fd`. Two older commits are needed as well: UCE's
train-scripts/train_erase.py at 35e91e2 and ESD's (rohitgandikota/erasing) CompVis sampler at a2189e9
(ldm/models/diffusion/ddim.py, ldm/models/diffusion/sampling_util.py, ldm/modules/diffusionmodules/util.py).
They are read from DIR/<owner>+<name>@<commit>/<path> (a checkout at that commit; `uce-old` is accepted for UCE's)
or, with `--git-mirrors M`, from the git directory M/<owner>+<name>/repo (or M/<owner>+<name>) by `git show`.

Run: OMP_NUM_THREADS=1 python benchmarks/reference_parity.py --references DIR [--git-mirrors M] [--only NAME]
(about half a minute on one CPU thread once the digits world's DDPM is cached; building it takes minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUPS = ("salun", "uce_esd", "doco_laf", "gan_sparse", "ant")


def quiet() -> None:
    """No progress bars nor library warnings between the result lines."""
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--references", required=True, type=Path, help="folder of the authors' checkouts")
    parser.add_argument(
        "--git-mirrors", type=Path, default=None, help="folder of git mirrors, for older commits"
    )
    parser.add_argument("--only", choices=GROUPS, help="run one group")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "reference_parity.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the authors' progress bars

    sys.path[:0] = [str(HERE / "reference_parity_groups"), str(HERE.parent / "tests"), str(HERE.parent)]
    from common import MissingReference, Refs, Results

    refs = Refs(args.references, args.git_mirrors)
    groups = [args.only] if args.only else list(GROUPS)
    modules = {name: importlib.import_module(name) for name in groups}
    missing = []
    for module in modules.values():
        for repo, rel, commit in module.FILES:
            try:
                refs.source(repo, rel, commit)
            except MissingReference as error:
                missing.append(str(error))
    if missing:
        more = f" (and {len(missing) - 1} more reference files)" if len(missing) > 1 else ""
        print(f"Missing reference file: {missing[0]}{more}; see --help for the layout of --references.")
        return 2

    import torch

    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the authors' code moves everything to the GPU
    torch.nn.Module.cuda = lambda self, *a, **k: self
    quiet()
    checks, started = [], time.time()
    for name, module in modules.items():
        results = Results(name, out=sys.stdout)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the authors' and our progress prints
                module.run(refs, results)
        except MissingReference as error:
            print(f"Missing reference file: {error}.")
            return 2
        checks += results.checks
    failed = [c for c in checks if not c["pass"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {time.time() - started:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"groups": groups, "checks": checks, "passed": not failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
