"""The benchmark shape set: every distinct BatchNorm input shape of
torchvision's ResNet-50 (v1.5, stride on the 3x3 conv), plus one (N, C), one
(N, C, L) and one 5-D case."""

# (C, H, W) of each distinct BN layer in ResNet-50, in network order.
RESNET50_CHW = [
    (64, 112, 112),   # stem
    (64, 56, 56),     # layer1 conv1/conv2
    (256, 56, 56),    # layer1 conv3 / downsample
    (128, 56, 56),    # layer2.0 conv1
    (128, 28, 28),    # layer2 conv2
    (512, 28, 28),    # layer2 conv3 / downsample
    (256, 28, 28),    # layer3.0 conv1
    (256, 14, 14),    # layer3 conv2
    (1024, 14, 14),   # layer3 conv3 / downsample
    (512, 14, 14),    # layer4.0 conv1
    (512, 7, 7),      # layer4 conv2
    (2048, 7, 7),     # layer4 conv3 / downsample
]


def shape_set(batch):
    """List of (name, shape). Extra cases scale with the batch like the rest."""
    shapes = [(f"resnet50 {c}x{h}x{w}", (batch, c, h, w)) for c, h, w in RESNET50_CHW]
    shapes += [
        ("(N, C) mlp", (batch * 32, 1024)),
        ("(N, C, L) seq", (batch, 256, 1024)),
        ("5-D video", (max(1, batch // 4), 64, 8, 28, 28)),
    ]
    return shapes
