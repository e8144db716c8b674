"""Operations: the object store, the model registry, the gate, packaging, drift monitoring, the
production log's retention and the review database."""
