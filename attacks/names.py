"""The attack vocabulary a user chooses from, without TensorFlow: the binaries validate their flags with it
before TensorFlow loads. Each name is defined here only; the modules that implement them import it."""

ATTACKS = ("dlg", "idlg", "ig", "grnn")  # attacks.experiment
THREATS = ("none", "fixed-key", "adaptive", "adaptive-key", "oracle")  # attacks.model
ADAPTIVE_STRATEGIES = (  # attacks.base: how the 'adaptive' threat searches the unknown gamma/beta
    "joint",
    "prior",
    "mixed",
    "relearn",
    "relearn-mixed",
    "relearn-uniform",
    "relearn-alternating",
)
