"""What travels between server and clients: bit-packed integer codes (``packing``) and the
payload format of a model (``payload``). Free of Flower."""
