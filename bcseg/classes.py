"""The five tissue classes, their QuPath names and colours, and the BCSS code mapping.

Label maps use 0 for background (not tissue) and 1..5 for the classes below, in this order.
The model's output channel ``i`` is label ``i + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND_LABEL = 0
IGNORE_INDEX = 255  # training target value for pixels that count in neither loss nor metrics


@dataclass(frozen=True)
class TissueClass:
    label: int  # value in label maps, 1..5
    name: str  # short name used in file names, tables and summary.json
    qupath_name: str  # QuPath's standard class name, so imported regions merge with its classes
    color: tuple[int, int, int]  # RGB, QuPath's colour for that class


CLASSES: tuple[TissueClass, ...] = (
    TissueClass(1, "tumor", "Tumor", (200, 0, 0)),
    TissueClass(2, "stroma", "Stroma", (150, 200, 150)),
    TissueClass(3, "inflammatory", "Immune cells", (160, 90, 160)),
    TissueClass(4, "necrosis", "Necrosis", (50, 50, 50)),
    TissueClass(5, "other", "Other", (255, 200, 0)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
NUM_CLASSES = len(CLASSES)

# BCSS ground-truth codes (the dataset's gtruth_codes.tsv) and the group each one joins.
# None means ignored: code 0 is "outside_roi" (not annotated) and code 7 is "exclude".
# Public code disagrees on 14 (lymphatics) and 15 (undetermined); this table puts both in "other".
BCSS_CODE_NAMES: dict[int, str] = {
    0: "outside_roi", 1: "tumor", 2: "stroma", 3: "lymphocytic_infiltrate",
    4: "necrosis_or_debris", 5: "glandular_secretions", 6: "blood", 7: "exclude",
    8: "metaplasia_NOS", 9: "fat", 10: "plasma_cells", 11: "other_immune_infiltrate",
    12: "mucoid_material", 13: "normal_acinus_or_duct", 14: "lymphatics", 15: "undetermined",
    16: "nerve", 17: "skin_adnexa", 18: "blood_vessel", 19: "angioinvasion", 20: "dcis",
    21: "other",
}
DEFAULT_BCSS_GROUPS: dict[int, str | None] = {
    0: None, 7: None,
    1: "tumor", 19: "tumor", 20: "tumor",
    2: "stroma",
    3: "inflammatory", 10: "inflammatory", 11: "inflammatory",
    4: "necrosis",
    **{code: "other" for code in (5, 6, 8, 9, 12, 13, 14, 15, 16, 17, 18, 21)},
}


def class_by_name(name: str) -> TissueClass:
    for tissue_class in CLASSES:
        if tissue_class.name == name:
            return tissue_class
    raise KeyError(f"unknown tissue class {name!r}; known classes: {', '.join(CLASS_NAMES)}")


def code_lookup_table(groups: dict[int, str | None] = DEFAULT_BCSS_GROUPS):
    """Build a 256-entry uint8 table from BCSS code to training target.

    Targets are model channels 0..4; ignored codes and codes missing from ``groups`` map to
    IGNORE_INDEX. Apply it as ``table[mask]``.
    """
    import numpy as np

    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for code, group in groups.items():
        if group is not None:
            table[code] = class_by_name(group).label - 1
    return table
