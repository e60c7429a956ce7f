"""Building blocks of the config sections (:mod:`spice_ray.config`): the strict base model every
section derives from, and the ``resources`` field of custom Ray resources a stage's actors ask for."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources only: CPUs and GPUs have their own keys, and Ray sets memory itself."""
    builtin = [name for name in value if name in RAY_BUILTIN_RESOURCES or not name.strip()]
    if builtin:
        raise PydanticCustomError(
            "builtin_resource", "custom resources only, not {names}: CPUs and GPUs have their own keys in this section",
            {"names": ", ".join(repr(n) for n in builtin)},
        )
    return value


CustomResources = Annotated[dict[str, Annotated[float, Field(ge=0)]], AfterValidator(_custom_resources)]


def _resources_field(unit: str) -> Any:
    return Field(
        default_factory=dict,
        description=f"Custom Ray resources {unit} requests, e.g. {{gpu_pool: 1}}: it runs only on nodes started with "
        "them (`ray start --resources`). {}: none. The local executor ignores them.",
    )
