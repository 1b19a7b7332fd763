"""A small CPU replication of the MiLoRA paper's claims (see replication/README.md)."""
