"""The serving image's Python requirements, read from pyproject.toml: `cpu` or `gpu`.

  python3 deploy/image-requirements.py cpu|gpu [PYPROJECT]

`cpu`: rnnserve's dependencies. `gpu`: the same with onnxruntime replaced by the `gpu` extra,
onnxruntime-gpu with the CUDA and cuDNN wheels it loads (its `cuda` and `cudnn` extras), so the
image needs no CUDA toolkit; onnxruntime and onnxruntime-gpu share one package folder, so only
one of them may be installed. `make lock` (requirements/lock.py) compiles these lines into the
images' locks, requirements/image-cpu.txt and image-gpu.txt, which the images install (not
these lines) before the wheels built on the host.
"""

import sys
import tomllib

CUDA_EXTRAS = "[cuda,cudnn]"


def requirements(flavour: str, project: dict) -> list[str]:
    """The requirement lines for `flavour`, from pyproject.toml's [project] table."""
    dependencies = list(project["dependencies"])
    if flavour == "cpu":
        return dependencies
    gpu = project["optional-dependencies"]["gpu"]
    return [d for d in dependencies if not _is_for(d, "onnxruntime")] + [
        d.replace("onnxruntime-gpu", "onnxruntime-gpu" + CUDA_EXTRAS, 1)
        if _is_for(d, "onnxruntime-gpu")
        else d
        for d in gpu
    ]


def _is_for(requirement: str, name: str) -> bool:
    """Whether `requirement` is one on the distribution `name` (not one whose name starts so)."""
    rest = requirement[len(name) :]
    return requirement.startswith(name) and (not rest or rest[0] in "<>=!~[; ")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("cpu", "gpu"):
        sys.exit(__doc__)
    with open(sys.argv[2] if len(sys.argv) == 3 else "pyproject.toml", "rb") as file:
        lines = requirements(sys.argv[1], tomllib.load(file)["project"])
    sys.stdout.write("".join(line + "\n" for line in lines))
