"""Find environments by name: the built-ins, then third-party ones registered under the
`atomlab.environments` entry-point group, then `reasoning-gym:<dataset>` adapters.

A third-party package declares, in its pyproject.toml:

    [project.entry-points."atomlab.environments"]
    my-env = "my_package.envs:MyEnvironment"

and the object named there is an Environment subclass (or a function returning an instance).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from atomlab.envs.base import Environment
from atomlab.errors import AtomlabError

ENTRY_POINT_GROUP = "atomlab.environments"


def builtin_environments() -> list[Environment]:
    from atomlab.envs import builtin, code, tools

    return [cls() for cls in builtin.ENVIRONMENTS + code.ENVIRONMENTS + tools.ENVIRONMENTS]


def _plugin(name: str) -> Environment | None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name or name.startswith(f"{point.name}-v"):
            try:
                made = point.load()()
            except Exception as exc:
                raise AtomlabError(f"environment {name}: entry point {point.value} failed to load: {exc}") from None
            if not isinstance(made, Environment):
                raise AtomlabError(f"environment {name}: entry point {point.value} did not give an atomlab Environment")
            return made
    return None


def plugin_names() -> list[str]:
    return sorted(point.name for point in entry_points(group=ENTRY_POINT_GROUP))


def load_environment(name: str) -> Environment:
    """`arithmetic` (latest version) or `arithmetic-v1` (that version), a plugin, or `reasoning-gym:NAME`."""
    if name.startswith("reasoning-gym:"):
        from atomlab.envs.reasoning_gym import ReasoningGymEnvironment

        return ReasoningGymEnvironment(name.split(":", 1)[1])
    for env in builtin_environments():
        if name in (env.name, env.id):
            return env
    found = _plugin(name)
    if found is not None and name in (found.name, found.id):
        return found
    known = [env.name for env in builtin_environments()] + plugin_names()
    raise AtomlabError(
        f"environment {name!r} not found; known: {', '.join(known)} (or reasoning-gym:DATASET with that extra)"
    )


def list_environments() -> list[Environment]:
    found = builtin_environments()
    for name in plugin_names():
        env = _plugin(name)
        if env is not None:
            found.append(env)
    return found
