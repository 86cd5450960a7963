"""CycleGAN augmentation (the paper's augmentation v2): Normal -> COVID-19 image synthesis for training.

* :mod:`~cxr_monai.gan.networks` - ResNet generator and PatchGAN discriminator (Zhu et al. 2017);
* :mod:`~cxr_monai.gan.losses` - LSGAN adversarial, cycle and identity losses;
* :mod:`~cxr_monai.gan.data` - the two image domains from a datalist, their pairing and pre-processing;
* :mod:`~cxr_monai.gan.engine` - one CycleGAN iteration, the process function of the training engine;
* :mod:`~cxr_monai.gan.handlers` - the loss log and the trained generator/sample grid the engine writes;
* :mod:`~cxr_monai.gan.trainer` - the trained-GAN directory, its checkpoints and resume;
* :mod:`~cxr_monai.gan.synthesize` - synthetic COVID-19 training images and the extended datalist.

``bundles/cxr_cyclegan/configs/train.json`` and ``inference.json`` wire these together.

Research use only: synthetic images are an augmentation experiment, never evidence of disease.
"""
