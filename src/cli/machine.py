"""`gridserve hardware` and `gridserve recommend`: what this machine has, and which catalog models fit it."""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field

from gridserve.cli.render import dumps, mem, num, table

MIB = 1024 * 1024


@dataclass
class Gpu:
    index: int
    name: str
    memory_bytes: int


@dataclass
class Hardware:
    hostname: str
    cpus_logical: int
    cpus_physical: int
    memory_total_bytes: int
    memory_available_bytes: int
    disk_path: str
    disk_total_bytes: int
    disk_free_bytes: int
    torch: str                        # torch's version, or why it is not usable
    gpus: list[Gpu] = field(default_factory=list)


def torch_gpus() -> tuple[str, list[Gpu]]:
    """The CUDA GPUs torch sees. torch is imported here only: it takes seconds to load."""
    try:
        import torch
    except ImportError as e:
        return f"not installed ({e})", []
    if not torch.cuda.is_available():
        return torch.__version__, []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(i, props.name, int(props.total_memory)))
    return torch.__version__, gpus


def probe(disk_path: str = ".") -> Hardware:
    import psutil

    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(disk_path)
    version, gpus = torch_gpus()
    return Hardware(hostname=platform.node(), cpus_logical=psutil.cpu_count() or 1,
                    cpus_physical=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
                    memory_total_bytes=vm.total, memory_available_bytes=vm.available,
                    disk_path=os.path.abspath(disk_path), disk_total_bytes=disk.total, disk_free_bytes=disk.free,
                    torch=version, gpus=gpus)


def hardware_text(hw: Hardware) -> str:
    rows = [["host", hw.hostname], ["cpus", f"{hw.cpus_logical} logical, {hw.cpus_physical} physical"],
            ["memory", f"{mem(hw.memory_available_bytes)} available of {mem(hw.memory_total_bytes)}"],
            ["disk", f"{mem(hw.disk_free_bytes)} free of {mem(hw.disk_total_bytes)} ({hw.disk_path})"],
            ["torch", hw.torch], ["gpus", str(len(hw.gpus)) if hw.gpus else "none seen by torch"]]
    rows += [[f"gpu {g.index}", f"{g.name}, {mem(g.memory_bytes)}"] for g in hw.gpus]
    return table(["WHAT", "THIS MACHINE"], rows)


def fit(config, hw: Hardware) -> dict:
    """Whether one model's replica fits this machine (available memory, logical CPUs, GPUs), how many
    replicas would, and why not."""
    res = config.resources
    need_mem = res.memory_mb * MIB
    why = []
    if res.num_cpus > hw.cpus_logical:
        why.append(f"needs {num(res.num_cpus)} CPUs, has {hw.cpus_logical}")
    if res.num_gpus > len(hw.gpus):
        why.append(f"needs {num(res.num_gpus)} GPU(s), torch sees {len(hw.gpus)}")
    if need_mem > hw.memory_available_bytes:
        why.append(f"needs {mem(need_mem)} memory, {mem(hw.memory_available_bytes)} available")
    limits = [int(hw.cpus_logical // res.num_cpus)]
    if need_mem:
        limits.append(int(hw.memory_available_bytes // need_mem))
    if res.num_gpus:
        limits.append(int(len(hw.gpus) // res.num_gpus))
    return {"model": config.name, "fits": not why, "replicas": 0 if why else min(limits),
            "num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "memory_mb": res.memory_mb,
            "context_length": config.context_length, "why_not": "; ".join(why),
            "description": config.description}


def recommend(catalog, hw: Hardware) -> list[dict]:
    """Every catalog model, the ones that fit first; among those the largest (memory, then context) first."""
    fits = [fit(c, hw) for c in catalog.models.values()]
    return sorted(fits, key=lambda f: (not f["fits"], -f["memory_mb"], -f["context_length"], f["model"]))


def recommend_text(rows: list[dict], hw: Hardware) -> str:
    body = table(["MODEL", "FITS", "REPLICAS", "CPUS", "GPUS", "MEMORY", "WHY NOT"],
                 [[r["model"], "yes" if r["fits"] else "no", str(r["replicas"]) if r["fits"] else "-",
                   num(r["num_cpus"]), num(r["num_gpus"]), mem(r["memory_mb"] * MIB), r["why_not"] or "-"]
                  for r in rows])
    return (f"{body}\n(this machine: {hw.cpus_logical} CPUs, {mem(hw.memory_available_bytes)} memory available, "
            f"{len(hw.gpus)} GPU(s))")


def hardware_json(hw: Hardware) -> str:
    return dumps(asdict(hw))


def cmd_hardware(args) -> int:
    hw = probe(args.path)
    print(hardware_json(hw) if args.output == "json" else hardware_text(hw))
    return 0


def cmd_recommend(args) -> int:
    from gridserve.cli.headclient import CliError
    from gridserve.common.model_config import load_model_catalog
    from gridserve.common.errors import ConfigError

    try:
        catalog = load_model_catalog(args.model_configs or None)
    except ConfigError as e:
        raise CliError(f"error: {e.message}") from None
    hw = probe()
    rows = recommend(catalog, hw)
    if args.output == "json":
        print(dumps({"machine": asdict(hw), "catalog_path": catalog.path, "models": rows}))
    else:
        print(recommend_text(rows, hw))
    return 0
