"""Scale-out: FSDP2 over a device mesh (Lightning's ModelParallelStrategy) and the DeepSpeed strategy."""
