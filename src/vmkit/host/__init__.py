"""The host side: where things live, instance directories, images, provisioning of cloud guests."""
