"""Optimizer parameter groups that give a loss's own parameters (proxies, class weights,
centres learned by gradient) a learning rate of their own.

Proxy and classifier losses learn one vector per class, and these usually want a much larger
learning rate than the network (Proxy-Anchor uses 100 times the network's). A loss is an
`nn.Module`, so its parameters are `loss_fn.parameters()`; this helper builds the two groups:

    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, lr=1e-4, loss_lr=1e-2))

Centres updated by the centre-loss rule (`CenterLoss(alpha=...)`) are buffers, not
parameters, so no optimizer touches them.
"""

from __future__ import annotations

from torch import nn

from deepmetric._validation import check_non_negative, check_positive


def param_groups(
    model: nn.Module,
    loss: nn.Module,
    *,
    lr: float,
    loss_lr: float | None = None,
    weight_decay: float = 0.0,
    loss_weight_decay: float = 0.0,
) -> list[dict]:
    """Two optimizer parameter groups: the model's parameters and the loss's.

    Frozen parameters (requires_grad=False) are left out, and so is a group left empty
    (a loss without parameters). Each group carries a "name" key ("model" or "loss") for
    logging; optimizers ignore it.

    Args:
        model: the embedding network.
        loss: the loss module (its parameters: proxies, class weights, ...).
        lr: the model's learning rate, > 0 and finite.
        loss_lr: the loss's learning rate, > 0 and finite (default: lr).
        weight_decay: the model's weight decay, >= 0.
        loss_weight_decay: the loss's weight decay, >= 0 (default 0: decaying proxies
            shrinks them toward the origin, which normalised losses do not need).

    Example:
        >>> import torch
        >>> from deepmetric.losses.proxy import ProxyAnchorLoss
        >>> model, loss_fn = torch.nn.Linear(8, 4), ProxyAnchorLoss(3, 4)
        >>> groups = param_groups(model, loss_fn, lr=1e-4, loss_lr=1e-2)
        >>> optimizer = torch.optim.AdamW(groups)
        >>> [g["lr"] for g in optimizer.param_groups]
        [0.0001, 0.01]
    """
    lr = check_positive(lr, "lr")
    loss_lr = lr if loss_lr is None else check_positive(loss_lr, "loss_lr")
    weight_decay = check_non_negative(weight_decay, "weight_decay")
    loss_weight_decay = check_non_negative(loss_weight_decay, "loss_weight_decay")
    model_params = [p for p in model.parameters() if p.requires_grad]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    shared = {id(p) for p in model_params} & {id(p) for p in loss_params}
    if shared:
        raise ValueError(
            f"{len(shared)} parameter(s) belong to both the model and the loss; an optimizer "
            "must see each parameter once, so keep the loss's class vectors out of the model"
        )
    groups = [
        {"params": model_params, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        {"params": loss_params, "lr": loss_lr, "weight_decay": loss_weight_decay, "name": "loss"},
    ]
    return [group for group in groups if group["params"]]
