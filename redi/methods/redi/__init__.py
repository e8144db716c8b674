"""ReDi (Recover-then-Discriminate): its detector, recover and discriminate nets, losses, prompt
bank, ONNX export and fitting stages. Importing this package registers the method ``redi``."""

from redi.methods.redi import method as _method  # noqa: F401  (registers "redi")
