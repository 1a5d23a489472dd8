"""Megatron-style pretraining framework: models (pretrain.models), data (pretrain.data).

Importing ``pretrain`` is cheap; megatron-core is imported by the subpackages that need it.
"""

import warnings

# megatron-core warns at import time that Apex / Transformer Engine are absent and that it falls
# back to torch implementations. That is the expected state on CPU machines; silence just those.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* (is|are) not installed")
# ...and TransformerConfig warns about its own default cuda_graph_scope on every model build.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

__version__ = "0.1.0"
