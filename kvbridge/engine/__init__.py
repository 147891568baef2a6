from kvbridge.engine.blas import reproducible_blas

reproducible_blas()  # before MKL's first call in this process
