"""MetaWorld v3 task names, their prompts and their scripted experts, as lerobot maps them.

lerobot's `lerobot/envs/metaworld.py` holds the mapping (task -> description, task -> expert class);
importing it imports metaworld and mujoco, so it is imported here only when a name is checked.
"""

from __future__ import annotations


def task_names() -> list[str]:
    """Every v3 task name lerobot knows a description and an expert for, sorted."""
    try:
        from lerobot.envs.metaworld import TASK_DESCRIPTIONS, TASK_POLICY_MAPPING
    except ImportError as exc:
        raise ValueError(f"MetaWorld needs the sim extra ({exc.name} is missing): pip install 'craft_ext[sim]'") from None

    return sorted(set(TASK_DESCRIPTIONS) & set(TASK_POLICY_MAPPING))


def parse_tasks(text: str | None) -> list[str]:
    """The comma-separated task names in `text`, checked; a ValueError lists the valid names."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise ValueError("no MetaWorld task given: name one or more v3 tasks, comma-separated, e.g. reach-v3,drawer-open-v3")
    valid = task_names()
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown MetaWorld task(s) {', '.join(unknown)}; the v3 tasks are: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a MetaWorld task is named twice in {text!r}")
    return names


def task_description(task: str) -> str:
    """The prompt of `task` (lerobot's description, what its rollouts give the policy as `task`)."""
    from lerobot.envs.metaworld import TASK_DESCRIPTIONS

    return TASK_DESCRIPTIONS[task]
