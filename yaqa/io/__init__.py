from .checkpoint import CheckpointError, SavedCheckpoint, load, read_record, save_quantized
from ..nn.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["CheckpointError", "SavedCheckpoint", "load", "read_record", "save_quantized",
           "pack_codes", "packed_nbytes", "unpack_codes"]
