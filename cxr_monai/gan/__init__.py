"""CycleGAN augmentation (the paper's augmentation v2): Normal -> COVID-19 image synthesis for training.

* :mod:`~cxr_monai.gan.networks` - ResNet generator and PatchGAN discriminator (Zhu et al. 2017);
* :mod:`~cxr_monai.gan.losses` - LSGAN adversarial, cycle and identity losses;
* :mod:`~cxr_monai.gan.data` - the two image domains from a datalist and their MONAI pre-processing;
* :mod:`~cxr_monai.gan.trainer` - the alternating generator/discriminator step and the training run;
* :mod:`~cxr_monai.gan.synthesize` - synthetic COVID-19 training images and the extended datalist.

Research use only: synthetic images are an augmentation experiment, never evidence of disease.
"""
