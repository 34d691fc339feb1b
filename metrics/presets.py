"""Built-in metric presets (``xaibench.presets``).

``paper``: the conventions of the official ODAM evaluation scripts (Zhao & Chan, ICLR 2023,
github.com/Cyang-Zhao/ODAM ``tools/``), for numbers comparable with the paper's tables:

- box regions ``box_convention="odam"``: energy PG, ODI and box VEA count every pixel a box
  touches (floor(x1) .. ceil(x2) - 1); the pointing game hits when the peak's pixel indices
  lie strictly inside the box (``eval_pointgame.py``, ``eval_odi.py``);
- insertion ``start="zero"``: the step-0 score is 0, the detector does not see the black
  image (``eval_insert.py``);
- D-RISE ``masking="float"``: the masked image is the float product image x mask, not
  rounded to uint8 (DESIGN.md; Microsoft's implementation).

Without a preset the metrics keep xaibench's defaults (pixel centres, the detector on the
black image, uint8 masked images).
"""

from __future__ import annotations

from xaibench.presets import Preset
from xaibench.registry import PRESETS

PAPER = PRESETS.register(
    "paper",
    Preset(
        name="paper",
        description="the official ODAM evaluation conventions (box pixels, insertion step 0, "
        "D-RISE float masking)",
        metrics={
            "pointing-game": {"box_convention": "odam"},
            "energy-pg": {"box_convention": "odam"},
            "odi": {"box_convention": "odam"},
            "vea": {"box_convention": "odam"},
            "insertion": {"start": "zero"},
        },
        methods={"drise": {"masking": "float"}},
    ),
)
