"""A mixture-of-experts layer entirely in plain PyTorch: the reference that
switchyard.torch.MoE (router here, experts on the cluster) is compared
with, by moe_selftest.py and by moe_test.py against a live cluster.

The routing decisions are router.py's (tested against trainer/router.cc in
model_selftest.py); everything else is written out here on its own: the
experts are model.py's Ffn (expert_worker/expert_ffn.cc), the combine is
trainer/moe_client.h's, and the losses are trainer/router.h's formulas as
loops over experts.
"""

import torch
from torch import nn

from switchyard.torch.model import Ffn
from switchyard.torch.router import route


class ReferenceMoE(nn.Module):
    """y, aux = forward(x, capacity_factor): x, y (T, d); aux the 0-dim sum
    of aux_loss_coeff * E * sum_i f_i P_i and z_loss_coeff *
    mean_t logsumexp(logits_t)^2. Parameters: router (d, E) and experts[e]
    (w1, b1, w2, b2) named as the export's layers.<l>.experts.<e>.*.
    config: a SwitchyardConfig (d_model, d_ff, num_experts, top_k,
    activation, expert_bias)."""

    def __init__(self, config, aux_loss_coeff, z_loss_coeff,
                 dtype=torch.float32):
        super().__init__()
        self.top_k = config.top_k
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.router = nn.Parameter(
            torch.zeros(config.d_model, config.num_experts, dtype=dtype))
        self.experts = nn.ModuleList(
            Ffn(config, dtype, dense=False) for _ in range(config.num_experts))

    def forward(self, x, capacity_factor):
        T, d = x.shape
        E = len(self.experts)
        logits = x @ self.router
        r = route(x, self.router, self.top_k, capacity_factor)
        out = torch.zeros(T, self.top_k, d, dtype=x.dtype)
        for e, expert in enumerate(self.experts):
            token, choice = (r.kept & (r.expert == e)).nonzero(as_tuple=True)
            if token.numel() > 0:
                out[token, choice] = expert(x[token])
        y = torch.zeros(T, d, dtype=x.dtype)
        for j in range(self.top_k):
            y = y + r.gate[:, j:j + 1] * out[:, j]
        probs = torch.softmax(logits, -1)
        aux = torch.zeros((), dtype=x.dtype)
        for e in range(E):
            f_e = float((r.expert[:, 0] == e).sum()) / T
            aux = aux + f_e * probs[:, e].mean()
        aux = self.aux_loss_coeff * E * aux
        z = self.z_loss_coeff * (torch.logsumexp(logits, -1) ** 2).mean()
        return y, aux + z

    def load_experts(self, tensors, layer):
        """Copies layers.<layer>.experts.<e>.{w1,b1,w2,b2} from `tensors`
        (a name -> tensor dict, e.g. read_safetensors')."""
        with torch.no_grad():
            for e, expert in enumerate(self.experts):
                for name, p in expert.named_parameters():
                    p.copy_(tensors["layers.%d.experts.%d.%s" %
                                    (layer, e, name)])

    def expert_tensors(self, layer):
        """{layers.<layer>.experts.<e>.<name>: tensor} of the experts."""
        return {"layers.%d.experts.%d.%s" % (layer, e, name):
                p.detach().clone()
                for e, expert in enumerate(self.experts)
                for name, p in expert.named_parameters()}
