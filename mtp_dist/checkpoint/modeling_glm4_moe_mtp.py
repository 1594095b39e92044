"""Copied by `mtp export hf` (mtp_dist) into the GLM-4.5 layout of a chained model, and named by
its config.json `auto_map`: transformers' Glm4MoeForCausalLM, told where this checkpoint's MTP
layers are. transformers finds MTP layers through `_keys_to_ignore_on_load_unexpected`, which
names GLM-4.5's own depths (layers 46 and 92); here they are the num_nextn_predict_layers layers
after the num_hidden_layers main ones. Load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; mtp_dist never imports it.
"""

from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM


class Glm4MoeMtpForCausalLM(Glm4MoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        first = config.num_hidden_layers
        # The loader ignores these keys in the main model and loads them into the MTP model
        # (transformers' MtpModel.get_mtp_weights_regex keeps the patterns whose first layer
        # number is at least num_hidden_layers).
        self._keys_to_ignore_on_load_unexpected = {
            rf"model\.layers\.{first + k}\..*" for k in range(config.num_nextn_predict_layers)
        }
