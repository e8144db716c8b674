"""Plain torch modules of ReDi: they know nothing of training, storage or serving."""
