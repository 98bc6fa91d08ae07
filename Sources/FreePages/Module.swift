// FreePages module
