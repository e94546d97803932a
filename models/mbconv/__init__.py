"""AlphaNet / AttentiveNAS MBConv supernets."""
