/** @type {AppTypes.Config} */
// OHIF configuration of the dicom-covid demo (written by `dicom-covid demo` next to its nginx
// configuration; nginx serves it as /app-config.js). One DICOMweb data source: the demo's
// Orthanc behind the same nginx at /dicom-web, so the viewer, the study list and the images
// share one origin (no CORS). RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
const dicomWebRoot = window.location.origin + '/dicom-web';

window.config = {
  name: 'dicom-covid demo',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // The heat map is a one-frame Secondary Capture (modality OT): no cine player for it.
  customizationService: {
    autoCineModalities: { $set: ['US'] },
  },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  // OHIF's own "investigational use" notice stays on: the demo is research software too.
  whiteLabeling: {
    createLogoComponentFn: function (React) {
      return React.createElement(
        'span',
        {
          'data-cy': 'dicom-covid-logo',
          style: { color: '#5acce6', fontWeight: 600, fontSize: '15px', whiteSpace: 'nowrap' },
        },
        'dicom-covid \u00b7 research use only'
      );
    },
  },
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'dicom-covid demo Orthanc (DICOMweb)',
        name: 'orthanc',
        wadoUriRoot: dicomWebRoot,
        qidoRoot: dicomWebRoot,
        wadoRoot: dicomWebRoot,
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {
          enabled: true,
        },
      },
    },
  ],
  httpErrorHandler: error => {
    console.warn('dicom-covid demo: DICOMweb request failed', error.status);
  },
};

// Work-around for a race in OHIF 3.13's SR viewport: it tells its SR display tool which report
// to draw (setTrackingUniqueIdentifiersForElement) in a React effect that can run after the
// source image was rendered -- typically when the image is already cached because it was shown
// before -- and nothing renders the annotations again, so the outline and its text box stay
// invisible until the user touches the image. Here every image render in an SR viewport is
// followed by a few annotation-only redraws (SVG, cheap; they do not render the image again).
(function redrawSrAnnotations() {
  const REDRAW_AFTER_MS = [100, 400, 1200, 3000];
  const hook = () => {
    const cs = window.cornerstone;
    const ct = window.cornerstoneTools;
    if (!cs?.eventTarget || !ct?.utilities?.triggerAnnotationRenderForViewportIds) {
      return false;
    }
    const pending = new Set();
    const onRendered = evt => {
      const { viewportId, renderingEngineId } = evt.detail || {};
      const group = ct.ToolGroupManager.getToolGroupForViewport(viewportId, renderingEngineId);
      if (!group || !String(group.id).startsWith('SRToolGroup') || pending.has(viewportId)) {
        return;
      }
      pending.add(viewportId);
      REDRAW_AFTER_MS.forEach((ms, i) =>
        setTimeout(() => {
          if (i === REDRAW_AFTER_MS.length - 1) {
            pending.delete(viewportId);
          }
          try {
            ct.utilities.triggerAnnotationRenderForViewportIds([viewportId]);
          } catch (e) {
            // the viewport went away meanwhile
          }
        }, ms)
      );
    };
    cs.eventTarget.addEventListener('CORNERSTONE_ELEMENT_ENABLED', evt => {
      evt.detail?.element?.addEventListener('CORNERSTONE_IMAGE_RENDERED', onRendered);
    });
    return true;
  };
  const timer = setInterval(() => hook() && clearInterval(timer), 50);
})();
