"""The SPCL network (paper Sec. 3.1): a ResNet encoder f and three heads on its features.

    h = f(x)                  encoder features                      [B, F]
    z = g(h)                  projection head (SimCLR), Eq. 1-2     [B, 128]
    m(|h_a - h_b|)            metric head, Eq. 3                    [P, 1]
    W_j h                     one prototype head per K_j, Eq. 4     [B, K_j]
"""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

from losses import spcl_loss

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NARROW_ARCHS = {"resnet18_narrow": 16}     # ResNet-18 at a base width of 16 instead of 64: CPU runs
ARCHS = TORCHVISION_ARCHS + tuple(NARROW_ARCHS)


class NarrowResNet(ResNet):
    """torchvision's ResNet-18 with every width divided by 64 / base_width (F = 8 * base_width)."""

    def __init__(self, base_width):
        super().__init__(BasicBlock, [2, 2, 2, 2])
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.layer1 = self._make_layer(BasicBlock, base_width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * base_width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * base_width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * base_width, 2, stride=2)
        self.fc = nn.Linear(8 * base_width, 1000)
        for m in self.modules():                # the initialisation torchvision's ResNet uses
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_encoder(arch, cifar_stem):
    """A torchvision ResNet without its fc (fc = Identity), so forward gives h [B, F].

    cifar_stem: for 32-pixel images, a 3x3 stride-1 first conv and no max-pool (SimCLR's CIFAR
    variant), which keeps layer1 at full resolution.

    Returns (encoder, F). The state dict keeps torchvision's names, so `torchvision.models.<arch>()`
    (with the same stem) loads it with strict=True once fc is set aside.
    """
    if arch in TORCHVISION_ARCHS:
        encoder = getattr(torchvision.models, arch)(weights=None)
    elif arch in NARROW_ARCHS:
        encoder = NarrowResNet(NARROW_ARCHS[arch])
    else:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    feature_dim = encoder.fc.in_features
    if cifar_stem:
        width = encoder.conv1.out_channels
        encoder.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
        encoder.maxpool = nn.Identity()
    encoder.fc = nn.Identity()
    return encoder, feature_dim


class SPCLModel(nn.Module):
    """Encoder plus the SimCLR projection head, the Siamese metric head and the prototype heads.

    forward(x [B, 3, H, W]) -> (h [B, F], z [B, out_dim]); the heads are called by losses.spcl_loss.
    heads_on: the features Eq. 3 and 4 read, "h" (the paper's Fig. 1 and the official code) or
    "z", the projection (the heads then take out_dim inputs).
    """

    def __init__(self, arch, cifar_stem, num_prototypes=(), out_dim=128, heads_on="h"):
        super().__init__()
        if heads_on not in ("h", "z"):
            raise ValueError(f"heads_on must be 'h' or 'z', got {heads_on!r}")
        self.encoder, F = build_encoder(arch, cifar_stem)
        self.feature_dim, self.heads_on = F, heads_on
        # SimCLR's head as in the official code: Linear-BN-ReLU-Linear-BN.
        self.projector = nn.Sequential(nn.Linear(F, F, bias=False), nn.BatchNorm1d(F),
                                       nn.ReLU(inplace=True), nn.Linear(F, out_dim, bias=False),
                                       nn.BatchNorm1d(out_dim))
        head_in = F if heads_on == "h" else out_dim
        self.metric_head = nn.Linear(head_in, 1)
        self.proto_heads = nn.ModuleList(nn.Linear(head_in, k) for k in num_prototypes)
        self.reset_proto_heads()

    @torch.no_grad()
    def reset_proto_heads(self, generator=None, weights=None):
        """New clusters have arbitrary ids, so the heads start over, with zero bias and weights
        N(0, 0.01) drawn on the CPU from `generator` (so that every rank, and a resumed run, draws
        the same), or copied from `weights`, one [K_j, F] tensor per head (centroid heads)."""
        for j, head in enumerate(self.proto_heads):
            if weights is None:
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
            else:
                head.weight.copy_(weights[j])
            head.bias.zero_()

    def forward(self, x):
        h = self.encoder(x)                     # B x F
        return h, self.projector(h)             # B x F, B x out_dim


class TrainingStep(nn.Module):
    """One forward gives Eq. 5's loss: the module DDP wraps, so that every parameter that the loss
    uses runs inside its forward() and gets its gradient synchronised. forward(v1, v2 [2P, 3, S,
    S], same [P], assignments [2P, H], use_prototypes) -> (loss, terms): the two views of P anchors
    then their P partners; use_prototypes False drops Eq. 3 and 4 (SimCLR's warm-up epochs).
    loss_settings: losses.spcl_loss's keyword arguments (w_con, temperature, contrast, group...)."""

    def __init__(self, model, **loss_settings):
        super().__init__()
        self.model, self.loss_settings = model, loss_settings

    def forward(self, v1, v2, same, assignments, use_prototypes):
        h, z = self.model(torch.cat([v1, v2]))             # 4P x F, 4P x 128: one pass, both views
        h1, h2 = h.float().chunk(2)
        z1, z2 = z.float().chunk(2)
        if self.model.heads_on == "z":               # Eq. 3 and 4 on the projection instead
            h1, h2 = z1, z2
        settings = dict(self.loss_settings)
        if not use_prototypes:
            settings.update(w_metric=0, w_proto=0)
        # The losses in float32: bf16 logits would cost NT-Xent's gradient ~1% at t = 0.1.
        with torch.autocast(v1.device.type, enabled=False):
            return spcl_loss(z1, z2, h1, h2, same=same, assignments=assignments,
                             metric_head=self.model.metric_head,
                             proto_heads=self.model.proto_heads, **settings)
